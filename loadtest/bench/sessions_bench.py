"""`make bench`, section "sessions" (#11): what checkpoints cost a loaded server, and what a
lost replica costs its sessions.

- Checkpoint overhead: 1000 sessions of the shipped `motion` at 100 Hz through the mux
  (quick: 40), split between two single-worker `s4serve serve` processes running side by
  side, one with checkpoints every 1 s and one without, each under its own load generator
  (as each worker of a two-worker server holds half the sessions); 6 rounds, the one with
  checkpoints started first in every other round. The overhead is the median over rounds of
  the CPU seconds (/proc) of the server with checkpoints vs the one without in the same
  round. Run one after the other (sessions 6-15), whole runs moved by up to ~35% with
  the VM's interference, with checkpoints off as often as on; side by side the VM does the
  same to both (two servers both without checkpoints: -3.3% and -1.9%). The server's own
  `s4serve_checkpoint_seconds` (the passes' working time) as a share of its CPU is the cost
  measured directly.
- Failover: loadtest/failover.py through nginx in front of 3 replicas sharing Redis, 30
  sessions (quick: 6) of `motion` at 20 frames/s; the replica holding the most is SIGKILLed.
  Per moved session: the longest wait between two outputs (SIGKILL to streaming again,
  including the client's backoff) and the samples replayed from the last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from loadtest.bench.proc_stats import cpu_seconds
from loadtest.cluster import Cluster, metric
from loadtest.failover import run_failover
from loadtest.processes import ServerProcess

MOTION = Path(__file__).resolve().parents[2] / "model" / "zoo" / "motion"


# quick mode (a smoke test): TorchScript steps, which start in a second instead of compiling
QUICK_ENV = {"STEP_COMPILER": "torchscript"}


def _side_by_side(intervals: tuple[str, str], scratch: Path, gateways: int, per: int,
                  hold: float, quick: bool) -> list[dict]:
    """Two single-worker servers under the same mux load at the same time, one per interval:
    whatever the VM does to one run it does to both."""
    with contextlib.ExitStack() as stack:
        servers = []
        for k, interval in enumerate(intervals):
            env = {"S4SERVE_CHECKPOINT_INTERVAL": interval,
                   "S4SERVE_SNAPSHOT_DIR": str(scratch / f"ck-{interval}-{k}"),
                   **({f"S4SERVE_{k}": v for k, v in QUICK_ENV.items()} if quick else {})}
            servers.append(stack.enter_context(
                ServerProcess.s4serve([MOTION], env=env, extra=["--workers", "1"])))
        before = [cpu_seconds(server.pid) for server in servers]
        outs = [scratch / f"mux-{k}.json" for k in range(len(servers))]
        loads = [subprocess.Popen(
            [sys.executable, "-m", "loadtest", "mux", "--url", server.url, "--gateways",
             str(gateways), "--sessions-per-gateway", str(per), "--rate", "100", "--hold",
             str(hold), "--drain", "5", "--json-out", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for server, out in zip(servers, outs, strict=True)]
        for load in loads:
            load.wait(timeout=600)
        cpu = [cpu_seconds(server.pid) - b for server, b in zip(servers, before, strict=True)]
        got = [{"interval": interval, "cpu_s": c, "report": json.loads(out.read_text()),
                "pass_s": metric(server.url, "s4serve_checkpoint_seconds_sum"),
                "passes": metric(server.url, "s4serve_checkpoint_seconds_count")}
               for interval, c, server, out in zip(intervals, cpu, servers, outs, strict=True)]
    return got


def checkpoint_overhead(scratch: Path, quick: bool, log=print) -> dict:
    """Each round runs a server with checkpoints and one without side by side, each with
    half the sessions (one worker each, as each of a two-worker server's workers has half),
    the one with checkpoints first in every other round."""
    gateways, per, hold, rounds = (1, 20, 2.0, 1) if quick else (5, 100, 15.0, 6)
    runs: dict[str, list[dict]] = {"0": [], "1.0": []}
    for n in range(rounds):
        order = ("1.0", "0") if n % 2 else ("0", "1.0")
        for got in _side_by_side(order, scratch, gateways, per, hold, quick):
            runs[got["interval"]].append(got)
        log(f"checkpoints side by side: {runs['1.0'][-1]['cpu_s']:.2f} CPU s with, "
            f"{runs['0'][-1]['cpu_s']:.2f} without")
    pairs = [b["cpu_s"] / a["cpu_s"] - 1 for a, b in zip(runs["0"], runs["1.0"], strict=True)
             if a["cpu_s"]]
    on = runs["1.0"]
    shares = [r["pass_s"] / r["cpu_s"] for r in on if r["cpu_s"]]
    per_pass = [r["pass_s"] / r["passes"] for r in on if r["passes"]]
    return {"sessions": 2 * gateways * per, "hold_s": hold, "rounds": rounds,
            "cpu_s": {k: float(np.median([r["cpu_s"] for r in v])) for k, v in runs.items()},
            "overhead": float(np.median(pairs)) if pairs else None, "pairs": pairs,
            "pass_share": float(np.median(shares)) if shares else None,
            "pass_ms": float(np.median(per_pass)) * 1e3 if per_pass else None,
            "passes": float(np.median([r["passes"] for r in on])),
            "ok": all(r["report"].get("ok") for v in runs.values() for r in v),
            "runs": runs}


def failover(scratch: Path, quick: bool, log=print) -> dict:
    sessions, frames, frame, pace = (6, 60, 5, 0.05) if quick else (30, 100, 5, 0.05)
    inputs = np.random.default_rng(0).standard_normal(
        (sessions, frames * frame, 6)).astype(np.float32)
    with Cluster(MOTION, replicas=3, scratch=scratch / "cluster",
                 env=QUICK_ENV if quick else None) as cluster:
        run = asyncio.run(run_failover(cluster, "motion", inputs, frame, pace,
                                       stop=signal.SIGKILL))
    moved = [s for s in run.sessions if s.reconnects]
    exact = all(s.outputs.shape == e.shape and np.allclose(s.outputs, e, atol=1e-4)
                for s, e in zip(run.sessions, run.expected, strict=True))
    gaps = [s.longest_gap_s for s in moved]
    replayed = [s.replayed for s in moved]
    log(f"failover: {len(moved)} sessions moved, exact {exact}")
    return {"sessions": sessions, "victim_sessions": run.victim_sessions, "moved": len(moved),
            "exact": exact, "frame": frame, "pace_s": pace,
            "recovery_s": {"p50": float(np.percentile(gaps, 50)) if gaps else None,
                           "p99": float(np.percentile(gaps, 99)) if gaps else None},
            "replayed_samples": {"mean": float(np.mean(replayed)) if replayed else None,
                                 "max": int(max(replayed)) if replayed else None}}


def run_sessions_benches(scratch: Path, quick: bool, log=print) -> dict:
    return {"checkpoints": checkpoint_overhead(scratch, quick, log),
            "failover": failover(scratch, quick, log)}


def render_sessions(r: dict) -> list[str]:
    ck, fo = r["checkpoints"], r["failover"]
    overhead = "-" if ck["overhead"] is None else f"{ck['overhead']:+.1%}"
    rec, rep = fo["recovery_s"], fo["replayed_samples"]
    f = lambda v, fmt=".2f": "-" if v is None else format(v, fmt)  # noqa: E731
    return [
        "## Sessions: checkpoint overhead and a lost replica", "",
        f"Checkpoints: {ck['sessions']} `motion` sessions at 100 Hz through the mux, "
        f"{ck['hold_s']:.0f} s, {ck['rounds']} round(s) of two single-worker servers side by "
        f"side, each with half the sessions: server CPU {ck['cpu_s']['0']:.2f} s without "
        f"checkpoints, {ck['cpu_s']['1.0']:.2f} s with a 1 s interval (local directory store) "
        f"(medians); with vs without in each round: "
        f"{', '.join(f'{p:+.1%}' for p in ck.get('pairs', []))}, median {overhead}; every "
        f"reply checked: "
        f"{'yes' if ck['ok'] else 'no'}. Measured in the server (its "
        f"`s4serve_checkpoint_seconds`): {f(ck.get('passes'), '.0f')} passes per run, "
        f"{f(ck.get('pass_ms'), '.1f')} ms of work each, "
        f"{f(ck.get('pass_share'), '.1%')} of that server's CPU.", "",
        f"Failover: {fo['sessions']} sessions through nginx in front of 3 replicas sharing "
        f"Redis, {fo['frame']}-sample frames every {fo['pace_s'] * 1e3:.0f} ms; the replica "
        f"holding {fo['victim_sessions']} of them SIGKILLed mid-stream; {fo['moved']} sessions "
        f"reconnected, outputs equal predict for every session: "
        f"{'yes' if fo['exact'] else 'no'}. SIGKILL to streaming again (the longest wait "
        f"between two outputs of a moved session, client backoff included): p50 "
        f"{f(rec['p50'])} s, p99 {f(rec['p99'])} s; samples replayed per moved session: mean "
        f"{f(rep['mean'], '.0f')}, max {f(rep['max'], 'd')}.", ""]


def targets(r: dict) -> list[tuple[str, str, str, bool]]:
    ck, fo = r["checkpoints"], r["failover"]
    rows = []
    if ck["overhead"] is not None:
        rows.append((f"checkpoint overhead, {ck['sessions']} sessions (server CPU, with vs "
                     "without side by side, median of rounds)",
                     "≤ 5%", f"{ck['overhead']:+.1%}", ck["overhead"] <= 0.05 and ck["ok"]))
    if ck.get("pass_share") is not None:
        rows.append((f"checkpoint passes' share of server CPU, {ck['sessions']} sessions",
                     "≤ 5%", f"{ck['pass_share']:.1%}", ck["pass_share"] <= 0.05 and ck["ok"]))
    p99 = fo["recovery_s"]["p99"]
    if p99 is not None:
        rows.append(("SIGKILL to streaming again, p99", "≤ 2 s + backoff", f"{p99:.2f} s",
                     p99 <= 2.0 + 2.0 and fo["exact"]))
    return rows
