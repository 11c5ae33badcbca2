"""bench.md and bench.png from a bench result."""

from __future__ import annotations

import sys
from pathlib import Path

from launch.commands.bench.data import markdown as data_markdown
from launch.commands.bench.memory import markdown as memory_markdown
from launch.commands.bench.meshes import steps_markdown
from launch.commands.bench.workloads import SEEDS, SEEDS_CROSSOVER, mlp_params


def _span(s: dict, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}, {fmt.format(s['max'])}] (n={s['n']})"


def _loops_table(comparisons: list[dict]) -> list[str]:
    lines = ["| scale | device | loop | train s: median [min, max] | ms/step | x bare loop |", "|---:|---|---|---|---:|---:|"]
    for o in comparisons:
        for name, r in o["loops"].items():
            lines.append(f"| {o['scale']} | {o['device']} | {name} | {_span(r)} | {r['ms_per_step']:.3f} | **{r['vs_bare']:.3f}** |")
    return lines


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"Measured {env['date']} on {env['cpu']} ({env['threads']} torch threads), {env.get('gpu') or 'no accelerator'}; torch {env['torch']}.", ""]
    if res.get("sweep"):
        lines += ["### The seeds' sweep (our loop; 1000 samples, batch 10, SGD lr 0.5/scale, fp32)", "",
                  "| scale | parameters | device | epochs | wall s: median [min, max] | samples/s | TFLOP/s | of peak | seeds, M2 Max (10 epochs) |",
                  "|---:|---:|---|---:|---|---:|---:|---:|---|"]
        for r in res["sweep"]:
            seeds = SEEDS.get(r["scale"])
            seed_txt = f"CPU {seeds['cpu']} s, MPS {seeds['mps']} s" if seeds else ""
            if "skipped" in r:
                lines.append(f"| {r['scale']} | {r['params']:,} | {r['device']} | | skipped: {r['skipped']} | | | | {seed_txt} |")
                continue
            frac = f"{100 * r['peak_fraction']:.1f}%" if r["peak_fraction"] else "n/a"
            lines.append(f"| {r['scale']} | {r['params']:,} | {r['device']} | {res['config']['epochs']} | {_span(r['wall_s'])} | {r['samples_per_s']:,.0f} | {r['tflops']:.4f} | {frac} | {seed_txt} |")
        for dev, c in res.get("crossover", {}).items():
            at = f"about {c['params'] / 1e6:.1f}M parameters ({c['note']})" if c["params"] else c["note"]
            lines.append(f"\nCrossover CPU -> {dev}: {at}. Seeds (M2 Max, MPS): near {SEEDS_CROSSOVER / 1e6:.0f}M parameters.")
        lines.append("")
    for b in res.get("big_batch", []):
        frac = f", {100 * b['peak_fraction']:.1f}% of peak" if b["peak_fraction"] else ""
        lines += [f"Large-batch bf16 ({b['device']}, scale {b['scale']}, {b['params']:,} parameters, batch {b['batch']}): epoch {_span(b['epoch_s'])} s, "
                  f"{b['samples_per_s']:,.0f} samples/s, {b['tflops']:.3f} TFLOP/s{frac}.", ""]
    if res.get("overhead"):
        lines += ["### Loop overhead (same model, data, seed and device; training epochs only)", "", *_loops_table(res["overhead"])]
        same = ", ".join(f"scale {o['scale']} {o['device']}: {'yes' if o['launch_equals_bare_weights'] else 'NO'}" for o in res["overhead"])
        lines += ["", f"Final weights of our loop and the bare loop bitwise identical (same computation): {same}.", ""]
    if res.get("peers"):
        lines += ["### Peers: PyTorch Lightning and Hugging Face Accelerate (same model, data, seed and device; training epochs only)", "", *_loops_table(res["peers"]), ""]
        for p in res["peers"]:
            lines.append(f"Peers on {p['device']}, scale {p['scale']}: " + "; ".join(f"{peer}: {state}" for peer, state in p["peers"].items()) + ".")
        lines.append("")
    if res.get("ddp"):
        lines += ["### DDP overhead (training epochs only)", "", "| comparison | scale | baseline s | DDP s | ratio |", "|---|---:|---|---|---:|"]
        for d in res["ddp"]:
            if "ddp_world_1" in d:
                lines.append(f"| world size 1 in DDP ({d['backend']}) vs no DDP, {d['device']} | {d['scale']} | {_span(d['no_ddp'])} | {_span(d['ddp_world_1'])} | **{d['ratio']:.3f}** |")
            else:
                lines.append(f"| 2 gloo processes (batch 5 each) vs 1 process (batch 10), CPU | {d['scale']} | {_span(d['world_1'])} | {_span(d['world_2_gloo'])} | **{d['ratio']:.3f}** |")
        lines.append("")
    if res.get("data"):
        lines += data_markdown(res["data"])
    if res.get("memory"):
        lines += memory_markdown(res["memory"])
    if res.get("meshes"):
        lines += steps_markdown(res["meshes"])
    if res.get("corpus"):
        from launch.commands.bench.corpus import markdown as corpus_markdown

        lines += corpus_markdown(res["corpus"])
    if res.get("sft"):
        from launch.commands.bench.finetune import sft_markdown

        lines += sft_markdown(res["sft"])
    return "\n".join(lines)


def plot(res: dict, path: Path) -> bool:
    """Drawn by launch.commands.plot's line_plot (matplotlib is an optional extra). Left, where the
    sweep ran: wall time vs parameters per device (medians; min and max are in the table), with the
    seeds' M2 Max times at their nine sizes. Right, where overhead or peers ran: each loop's median
    time per device against the parameters (our loop, the bare loop, the seeds' DataLoader loop,
    Lightning and Accelerate where installed)."""
    from launch.commands.plot import line_plot
    from launch.errors import UserError

    epochs_label = f"seconds for {res['config']['epochs']} epochs of 1000 samples"
    panels = []
    if res.get("sweep"):
        panels.append(dict(series=_sweep_series(res["sweep"]), title="The seeds' sweep: batch 10, SGD, fp32", xlabel="MLP parameters", ylabel=epochs_label, logx=True, logy=True))
    loops = _loop_series([*res.get("overhead", []), *res.get("peers", [])])
    if loops:
        panels.append(dict(series=loops, title="Training loops on the same workload", xlabel="MLP parameters", ylabel=epochs_label, logx=True, logy=True))
    try:
        line_plot({}, path, panels=panels)
    except UserError as e:
        print(f"note: no plot ({e})", file=sys.stderr)
        return False
    return True


def _sweep_series(rows: list[dict]) -> dict:
    series = {}
    for dev in sorted({r["device"] for r in rows}):
        pts = [(r["params"], r["wall_s"]["median"]) for r in rows if r["device"] == dev and "wall_s" in r]
        if pts:
            series[f"this machine: {dev} (launch loop)"] = tuple(zip(*pts))
    for dev, marker in (("cpu", "s"), ("mps", "^")):
        scales = sorted(SEEDS)  # the seeds' nine sizes, each at its own point
        series[f"seeds, M2 Max: {dev.upper()}"] = ([mlp_params(s) for s in scales], [SEEDS[s][dev] for s in scales], {"marker": marker, "linestyle": "--", "color": "grey", "alpha": 0.7})
    return series


def _loop_series(comparisons: list[dict]) -> dict:
    """(loop, device) -> its medians by parameter count; a loop timed in both overhead and peers at
    one size keeps the first."""
    points: dict[str, dict[int, float]] = {}
    for o in comparisons:
        for name, r in o["loops"].items():
            points.setdefault(f"{name} ({o['device']})", {}).setdefault(o["params"], r["median"])
    # measured at a few sizes only: points joined by a dotted guide, not a curve
    return {label: (*zip(*sorted(pts.items())), {"linestyle": ":", "markersize": 5}) for label, pts in points.items()}
