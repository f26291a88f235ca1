"""BENCHMARKS.md section for the model benches (loadtest/bench/model_bench.py): step, chunk and
conv times, the served step next to the memory roofline pass, accuracy, state scaling."""

from __future__ import annotations

from loadtest.bench.cells import dur, num, trow, yes
from loadtest.bench.model_bench import OFFICIAL_STEP_B1024_S


def render_model(r: dict) -> list[str]:
    lines = [
        "## Model (in process, 1 torch thread)", "",
        f"Conv length L = {r['conv_length']}; accuracy length L = {r['accuracy_length']}. "
        "Times: median (IQR) over repeats. Per-layer ratio = whole network / n_layers / official "
        "per-layer anchor (S4D step 500 µs, S4 Woodbury step 2.04 ms, block forward at L=16000 "
        "7.4 s S4D / 5.4 s S4); below 1 is faster than the official code.", "",
        "| layer | shape | step B=1 | step B=1024 | chunk T=320 | conv cold | conv warm "
        "| step/layer vs anchor | cold conv/layer vs anchor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for layer in ("s4d", "s4"):
        e = r.get(layer)
        if not e:
            continue
        c = e["config"]
        ratios = e["ratios"]
        lines.append(trow(
            layer, f"{c['n_layers']}×{c['d_model']}, N={c['d_state']}", dur(e["step"][1]),
            dur(e["step"][1024]), dur(e["chunk_320"]), dur(e["conv"]["cold"]),
            dur(e["conv"]["warm"]), num(ratios["step_per_layer_vs_anchor"]),
            num(ratios["conv_cold_per_layer_vs_anchor"]),
        ))  # fmt: skip
    lines += ["", *_served(r)]
    lines += ["", "### Step variants (whole network, list-of-tensors state, one graph per rate)",
              "", "The step columns above are the TorchScript graph (the served step where no C++ "
              "compiler is installed). Eager is the plain Python `RecurrentNetwork.step`; "
              "inductor is `compiled_step('inductor')` (torch.compile with the rate baked in).",
              "", "| layer | variant | step B=1 | step B=1024 |", "|---|---|---|---|"]
    for layer in ("s4d", "s4"):
        e = r.get(layer)
        if not e:
            continue
        variants = {"torchscript": e["step"], **e.get("step_variants", {})}
        for name, t in variants.items():
            lines.append(trow(layer, name, dur(t[1]), dur(t[1024])))
    lines += ["", "### Agreement with a float64 dense reference (max abs error)", "",
              trow("layer", "L", "step", "chunk (T=320)", "conv", "goal", "met"),
              trow(*["---"] * 7)]  # fmt: skip
    for layer in ("s4d", "s4"):
        a = r.get(layer, {}).get("accuracy")
        if a:
            worst = max(a["step"], a["chunk"], a["conv"])
            lines.append(
                trow(
                    layer,
                    a["length"],
                    f"{a['step']:.2e}",
                    f"{a['chunk']:.2e}",
                    f"{a['conv']:.2e}",
                    f"{a['goal']:.0e}",
                    yes(worst <= a["goal"]),
                )
            )
    lines += ["", "### Step cost vs state size (B=64; O(N) means flat ns per state element)", "",
              "| layer | N | step | ns per state element |", "|---|---|---|---|"]  # fmt: skip
    for layer in ("s4d", "s4"):
        for row in r.get(layer, {}).get("scaling", []):
            per = f"{row['ns_per_state_element']:.1f}"
            lines.append(trow(layer, row["d_state"], dur(row), per))
    return lines


def _served(r: dict) -> list[str]:
    """The served (fused) step next to the memory roofline pass and the official step."""
    rows = []
    for layer in ("s4d", "s4"):
        e = r.get(layer) or {}
        roof = e.get("roofline_1024")
        for served in (e.get("served_step"), e.get("served_step_aoti")):
            if not served or not roof:
                continue
            big = served[1024]["median_s"]
            layers = e["config"]["n_layers"]
            official = OFFICIAL_STEP_B1024_S.get(layer)
            vs_official = num(official * layers / big, ".3g") + "x" if official else "-"
            rows.append(trow(layer, served["compiler"], dur(served[1]), dur(served[1024]),
                             dur(roof), num(big / roof["median_s"], ".2f"), vs_official))
    if not rows:
        return []
    chunks = []
    native = (r.get("s4d") or {}).get("served_step") or {}
    if "chunk_32" in native and 1 in native:
        one = native[1]["median_s"]
        chunks = ["Native chunks (S4D, B=1; a block of T samples is T steps in one call): "
                  + ", ".join(f"T={t} {dur(native[f'chunk_{t}'])} = "
                              f"{native[f'chunk_{t}']['median_s'] / (t * one):.2f} × T steps"
                              for t in (32, 320)) + ".", ""]
    return ["### Served step (flat state rows, one compiled step per model; what streams run)",
            "",
            "native: the C step of S4D networks (model/native_step.c), rows advanced in place; "
            "aoti: the AOTInductor package it replaced for S4D (still the S4 step), same run. "
            "Roofline: one read and one write of the same B=1024 state (a copy), the least "
            "traffic a step can do. Official: the state-spaces/s4 S4D step at B=1024, 101 ms per "
            "layer (issue #9's measurement on this machine), times n_layers.", "",
            trow("layer", "compiler", "step B=1", "step B=1024", "roofline pass B=1024",
                 "step / roofline", "throughput vs official"),
            trow(*["---"] * 7), *rows, "", *chunks]
