"""BENCHMARKS.md from a suite result: tables of medians (IQR) and the ratios that matter."""

from __future__ import annotations

from loadtest.bench.cells import dur, num, trow, yes
from loadtest.bench.conv_report import render_conv
from loadtest.bench.model_report import render_model
from loadtest.bench.sessions_bench import render_sessions
from loadtest.bench.sessions_bench import targets as sessions_targets


def _machine(m: dict, command: str) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    load = " / ".join(f"{x:.1f}" for x in m["load_average_start"])
    end = " / ".join(f"{x:.1f}" for x in m.get("load_average_end", ()))
    return [
        f"- date: {m['date']}, commit {m['commit']}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['os']}",
        f"- python {m['python']}; {versions}",
        f"- load average (1/5/15 min) at start: {load}; at end: {end or '-'}",
        f"- command: `{command}`",
        f"- duration: {m.get('duration_s', 0):.0f} s",
    ]


def _backends(r: dict) -> list[str]:
    lines = ["## Backends (server runtimes, reference-size S4D, 1 thread)", "",
             "| backend | step B=1 | step B=1024 |", "|---|---|---|"]  # fmt: skip
    for kind in ("torch", "onnx"):
        e = r.get(kind, {})
        if e.get("available"):
            lines.append(trow(kind, dur(e[1]), dur(e[1024])))
        else:
            lines.append(f"| {kind} | not available: {e.get('reason', '?')} | - |")
    if "onnx_vs_torch" in r:
        ratio = r["onnx_vs_torch"]
        lines += ["", f"onnx / torch step time: B=1 {ratio[1]:.2f}, B=1024 {ratio[1024]:.2f}"]
    return lines


def _server(r: dict) -> list[str]:
    m = r["models"]
    lines = ["## Server end to end (loopback; client and server share the machine)", "",
             f"Models: motion = {m['motion']}; digits = {m['digits']}. Per-sample float32 frames "
             "at 100 Hz per session; latency is client send → reply over the hold phase. "
             f"Server and echo each run {r.get('workers', 1)} worker process(es); the load "
             "generator uses 2 processes from 300 sessions up.", "",
             "| sessions | target | frames/s (offered) | p50 ms | p99 ms | max ms | client lag ms "
             "| server batch mean | ok |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for n, entry in r["sessions"].items():
        for target in ("model", "echo"):
            e = entry[target]
            lat, tp = e["latency_hold_ms"], e["throughput"]
            batch = (e["server"].get("step_batch_size") or {}).get("mean")
            rate = f"{tp['frames_per_s']:.0f} ({tp['offered_frames_per_s']:.0f})"
            lines.append(
                trow(
                    n,
                    target,
                    rate,
                    num(lat["p50"]),
                    num(lat["p99"]),
                    num(lat["max"]),
                    num(e["client_max_send_lag_ms"]),
                    num(batch),
                    yes(e["ok"]),
                )
            )
    ratios = [f"{n} sessions {num(e['model_vs_echo'], '.2f')}" for n, e in r["sessions"].items()]
    lines += ["", "Model / echo message rate: " + ", ".join(ratios), ""]
    for n, entry in r["sessions"].items():
        for target in ("model", "echo"):
            for failure in entry[target]["failures"]:
                lines.append(f"- {n} sessions, {target}: {failure}")
    chunked = r.get("chunked")
    if chunked:
        lat, tp = chunked["latency_hold_ms"], chunked["throughput"]
        lines += ["", f"{chunked['sessions']} sessions × 10 frames/s of {chunked['frame']} "
                  f"samples: {tp['frames_per_s']:.0f} frames/s answered (offered "
                  f"{tp['offered_frames_per_s']:.0f}), p50 {num(lat['p50'])} ms, p99 "
                  f"{num(lat['p99'])} ms, all replies ok: {yes(chunked['ok'])}."]
    beside = r.get("beside_predict")
    if beside:
        p99, answer = beside["p99_ms"], beside["predict"]
        lines += ["", f"Streams beside the largest predict: {beside['body_mb']:.0f} MB of JSON "
                  f"(shape {tuple(beside['shape'])}), answered {answer.get('status')} in "
                  f"{num(answer.get('seconds'))} s; stream p99 {num(p99['during'])} ms during it "
                  f"vs {num(p99['baseline'])} ms without (same run), all replies ok: "
                  f"{yes(beside['during']['ok'])}."]
    mux = r.get("mux")
    if mux:
        tp, lat = mux["throughput"], mux["latency_ms"]
        lines += ["", f"### Mux: {mux['gateways']} gateway connections × "
                  f"{mux['sessions_per_gateway']} sessions × 100 Hz", "",
                  f"{tp['session_samples_per_s']:.0f} session-samples/s answered (offered "
                  f"{tp['offered_session_samples_per_s']:.0f}), {mux['counts']['lost']} "
                  f"messages lost, p50 {num(lat['p50'])} ms, p99 {num(lat['p99'])} ms; "
                  f"{mux['verify']['sessions']} sessions verified against predict (max abs "
                  f"error {mux['verify']['max_abs_err']:.1e}); all ok: {yes(mux['ok'])}"
                  + (f" ({'; '.join(mux['failures'])})" if mux["failures"] else "") + ".",
                  "", "Server CPU per session-sample "
                  f"{num(mux['server_cpu_per_session_sample_s'] * 1e6)} µs (all workers, "
                  "transport included"
                  + (f"; steady streaming, {mux['cpu_window_s'][0]:.1f}-"
                     f"{mux['cpu_window_s'][1]:.1f} s into the hold; over the whole run, "
                     "opening and closing the sessions included: "
                     f"{num(mux['server_cpu_per_session_sample_whole_run_s'] * 1e6)} µs"
                     if mux.get("cpu_window_s") else "")
                  + ") vs the served batched step in process at B="
                  f"{mux['step_batch']}: {num(mux['step_per_session_s'] * 1e6)} µs per "
                  f"session: {num(mux['cost_vs_step'], '.2f')}x on the same rows every call"
                  + (f"; cycling over the rows of {mux['cycled_sessions']} sessions (a worker's "
                     f"share, as the server holds them): "
                     f"{num(mux['step_cycled_per_session_s'] * 1e6)} µs, "
                     f"{num(mux['cost_vs_step_cycled'], '.2f')}x"
                     if "cost_vs_step_cycled" in mux else "")
                  + (f"; the same, each call after {num(mux['paced_gap_s'] * 1e3)} ms of idle "
                     "(the mean gap between a worker's messages: a core that waited runs cold): "
                     f"{num(mux['step_paced_per_session_s'] * 1e6)} µs, "
                     f"{num(mux['cost_vs_step_paced'], '.2f')}x"
                     if "cost_vs_step_paced" in mux else "") + "."]
    if mux and "step_in_server_per_session_s" in mux:
        inside = mux["step_in_server_per_session_s"]
        lines[-1] += (f" Inside the server its step calls took {num(inside * 1e6)} µs per session "
                      "(wall time, from its step histogram), so everything else (transport, "
                      "parsing, replies, metrics) came to "
                      f"{num((mux['server_cpu_per_session_sample_s'] - inside) * 1e6)} µs.")
    drop = r.get("drop")
    if drop:
        idle = "not within 30 s" if drop["idle_s"] is None else f"{drop['idle_s']:.2f} s"
        lines += ["", f"Disconnect: {drop['sessions']} sessions with "
                  f"{drop['queued_at_drop']:.0f} frames queued drop their TCP connections; the "
                  f"server is idle (queue 0, no batched calls) after {idle}; then "
                  f"{drop['new_sessions_started']} of {drop['sessions']} new sessions started in "
                  f"{drop['new_sessions_s']:.2f} s."]
    lines += _k6(r.get("k6"))
    lines += _profile(r.get("profile"))
    a = r["audio"]
    top = a["ladder"][-1] if a["ladder"] else None
    bound = "≥ " if top and top["sustained"] else ""
    limit = f"p99 < {a['p99_limit_ms']:.0f} ms"
    lines += ["", f"### Real-time 16 kHz audio (digits, 20 ms int16 frames, {limit})", "",
              f"Sustained: **{bound}{a['max_streams']} streams**.", "",
              trow("streams", "frames/s", "p99 ms", "all replies ok", "sustained"),
              trow(*["---"] * 5)]  # fmt: skip
    for s in a["ladder"]:
        lines.append(
            trow(
                s["streams"],
                f"{s['frames_per_s']:.0f}",
                num(s["p99_ms"]),
                yes(s["ok"]),
                "yes" if s["sustained"] else "no",
            )
        )
    return lines


def _gpu(r: dict) -> list[str]:
    lines = ["## GPU (CUDA conv view)", ""]
    if not r.get("available"):
        return [*lines, f"Not run: {r.get('reason', '?')}."]
    lines += [f"{r['device']}: batch {r['batch']} × L {r['length']}, reference-size network.", "",
              trow("layer", "cold", "warm", "max abs err vs CPU"), trow(*["---"] * 4)]  # fmt: skip
    for layer in ("s4d", "s4"):
        e = r[layer]
        lines.append(trow(layer, dur(e["cold"]), dur(e["warm"]), f"{e['max_abs_err_vs_cpu']:.2e}"))
    return lines


def _k6(k: dict | None) -> list[str]:
    if not k:
        return []
    if not k.get("available"):
        return ["", f"k6 cross-check not run: {k.get('reason')}"]
    lat = k["latency_ms"]
    return ["", f"k6 cross-check (loadtest/k6/stream.js, {k['sessions']} sessions, model): "
            f"{k['frames_answered']:.0f} of {k['frames_sent']:.0f} frames answered "
            f"({k['answered_per_s']:.0f}/s), latency ms p50 {num(lat['med'])}, "
            f"p90 {num(lat['p(90)'])}, p99 {num(lat['p(99)'])}, max {num(lat['max'])} "
            "(1 ms resolution); "
            f"checks {'passed' if k['passed'] else 'FAILED'}"
            + (f" ({_failed_checks(k)})." if not k["passed"] else ".")]  # fmt: skip


def _failed_checks(k: dict) -> str:
    parts = [f"{name}: {n} sessions failed" for name, n in k.get("failed_checks", {}).items()]
    if k.get("bad_replies"):
        parts.append(f"{k['bad_replies']:.0f} bad replies")
    return "; ".join(parts) or "thresholds crossed"


def _profile(p: dict | None) -> list[str]:
    if not p:
        return []
    lines = ["", f"### Where the server's CPU goes (py-spy, {p['sessions']} sessions)", ""]
    if not p.get("available"):
        return [*lines, f"Profile not taken: {p.get('reason')}"]
    lines += [f"{p['samples']} samples of the server process (all threads, on-CPU only).", "",
              trow("self time (leaf frame)", "share"), trow("---", "---"),
              *(trow(f"`{f}`", f"{share:.0%}") for f, share in p["self"]), "",
              trow("inclusive (s4serve code)", "share"), trow("---", "---"),
              *(trow(f"`{f}`", f"{share:.0%}") for f, share in p["inclusive"])]  # fmt: skip
    return lines


def _soak(r: dict) -> list[str]:
    run, growth = r["run"], r["rss_growth"]
    tp, lat = run["throughput"], run["latency_hold_ms"]
    mib = lambda b: f"{b / 2**20:.0f} MiB" if b else "-"  # noqa: E731
    return [f"## Soak ({r['sessions']} sessions × {r['rate']:.0f} Hz, {r['hold_s']:.0f} s, "
            f"{r['workers']} workers)", "",
            f"{tp['frames_per_s']:.0f} frames/s answered (offered "
            f"{tp['offered_frames_per_s']:.0f}), {tp['lost']} lost, p50 {num(lat['p50'])} ms, "
            f"p99 {num(lat['p99'])} ms; all replies "
            f"ok and no session closed: {yes(run['ok'])}"
            + (f" ({'; '.join(run['failures'])})" if run["failures"] else "") + ". Server RSS "
            f"(all workers) {mib(r['rss_after_warmup'])} after "
            f"{r.get('warm_s', 60):.0f} s of warm-up, {mib(r['rss_end'])} at "
            f"the end: {'-' if growth is None else f'{growth:+.1%}'}"
            + (f"; anonymous memory {mib(r['anon_after_warmup'])} -> {mib(r['anon_end'])}"
               if r.get("anon_end") else "") + "."
            + (" RSS (anonymous) every 30 s: " + ", ".join(
                f"{t} s {mib(total)} ({mib(anon)})" for t, total, anon in r["rss_curve"])
               + "." if r.get("rss_curve") else ""), ""]


def _targets(result: dict) -> list[str]:
    """The issue's targets next to what this run measured."""
    rows = []
    model = result.get("model") or {}
    s4d = model.get("s4d")
    if s4d and "step" in s4d:
        step = s4d["step"][1]["median_s"]
        rows.append(("whole-network S4D step, B=1", "≤ 200 µs", dur(s4d["step"][1]),
                     step <= 200e-6))
    for layer, goal in (("s4d", 1e-4), ("s4", 2e-4)):
        acc = (model.get(layer) or {}).get("accuracy")
        if acc:
            worst = max(acc["step"], acc["chunk"], acc["conv"])
            rows.append((f"{layer} max abs error, L={acc['length']}", f"≤ {goal:.0e}",
                         f"{worst:.2e}", worst <= goal))  # fmt: skip
    served = (s4d or {}).get("served_step")
    roof = (s4d or {}).get("roofline_1024")
    if served and roof:
        rows.append(("served S4D step, B=1", "≤ 100 µs", dur(served[1]),
                     served[1]["median_s"] <= 100e-6))
        ratio = served[1024]["median_s"] / roof["median_s"]
        rows.append(("served S4D step B=1024 vs roofline pass", "≤ 2x", f"{ratio:.2f}x",
                     ratio <= 2))
    server = result.get("server") or {}
    for n, entry in (server.get("sessions") or {}).items():
        ratio = entry["model_vs_echo"]
        lost = entry["model"]["throughput"].get("lost")
        good = ratio >= 0.8 and entry["model"]["ok"]
        rows.append((f"frames/s vs echo, {n} sessions × 100 Hz", "≥ 80%, 0 lost",
                     f"{ratio:.0%}, {lost} lost", good))
        if int(n) == 100:
            p99 = entry["model"]["latency_hold_ms"]["p99"]
            rows.append(("p99 at 100 sessions × 100 Hz", "≤ 25 ms", f"{num(p99)} ms",
                         p99 is not None and p99 <= 25))
    mux = server.get("mux")
    if mux:
        p99 = mux["latency_ms"]["p99"]
        rows.append((f"mux {mux['gateways'] * mux['sessions_per_gateway']} sessions × 100 Hz via "
                     f"{mux['gateways']} connections", "0 lost, p99 ≤ 50 ms",
                     f"{mux['counts']['lost']} lost, p99 {num(p99)} ms",
                     mux["ok"] and p99 is not None and p99 <= 50))
        cycled = mux.get("cost_vs_step_cycled")
        rows.append(("mux cost per session-sample vs in-process step (steady streaming, "
                     "over the served sessions' rows)", "≤ 2x",
                     f"{cycled:.2f}x ({mux['cost_vs_step']:.2f}x vs the same rows every call)"
                     if cycled else f"{mux['cost_vs_step']:.2f}x",
                     (cycled or mux["cost_vs_step"]) <= 2))
        paced = mux.get("cost_vs_step_paced")
        if paced:
            rows.append(("mux cost per session-sample vs in-process step paced as the "
                         "server's messages arrive (information: the target is the row above)",
                         "≤ 2x", f"{paced:.2f}x", paced <= 2))
    drop = server.get("drop")
    if drop:
        idle = drop["idle_s"]
        rows.append((f"idle after {drop['sessions']} loaded sessions disconnect", "≤ 1 s",
                     "-" if idle is None else f"{idle:.2f} s", idle is not None and idle <= 1))
    soak = result.get("soak")
    if soak and "run" in soak:
        growth = soak["rss_growth"]
        good = soak["run"]["ok"] and growth is not None and growth <= 0.05
        rows.append((f"soak {soak['sessions']} × 20 Hz, {soak['hold_s']:.0f} s",
                     "0 lost, none closed, RSS ≤ +5%",
                     f"{soak['run']['throughput']['lost']} lost, RSS "
                     f"{'-' if growth is None else f'{growth:+.1%}'}", good))
    if (result.get("sessions") or {}).get("checkpoints"):
        rows += sessions_targets(result["sessions"])
    audio = server.get("audio")
    if audio:
        n = audio["max_streams"]
        rows.append(("real-time 16 kHz audio streams, p99 < 100 ms", "≥ 32", str(n), n >= 32))
    if not rows:
        return []
    return ["## Targets", "", trow("target", "goal", "measured", "met"), trow(*["---"] * 4),
            *(trow(name, goal, got, yes(ok)) for name, goal, got, ok in rows), ""]  # fmt: skip


def render(result: dict, command: str) -> str:
    mode = "quick (small sizes, smoke only)" if result["quick"] else "full"
    lines = ["# s4serve benchmarks", "", f"Generated by `s4serve bench` ({mode}). "
             "Medians with IQR over repeats; ratios are taken within this one run.", "",
             *_machine(result["machine"], command), "", *_targets(result)]  # fmt: skip
    for key, section in (
        ("model", render_model),
        ("backends", _backends),
        ("server", _server),
        ("sessions", render_sessions),
        ("soak", _soak),
        ("conv", lambda r: render_conv(r, result.get("model"))),
        ("gpu", _gpu),
    ):
        value = result.get(key)
        if isinstance(value, dict) and "error" in value:
            lines += [f"## {key}", "", f"Did not complete: `{value['error']}`"]
        elif value:
            lines += section(value)
        lines.append("")
    return "\n".join(lines)
