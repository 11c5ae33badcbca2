"""`launch bench`: the seeds' MLP sweep, loop overhead, peers (Lightning, Accelerate), DDP overhead, the data path, memory per rank (DDP against FSDP) and reading a Parquet corpus per rank -> bench.json, bench.md, bench.png.

What is timed, everywhere: the training epochs only (data iteration, forward, backward, optimizer
step, and for our loop its per-step bookkeeping and periodic agreement), never process start-up,
model construction, evaluation or checkpoint writing. Our loop is the real `launch.train.loop.train`,
called in-process; its own epoch timer (recorded as samples_per_s in metrics.jsonl) gives the
epoch times. The other loops are timed the same way, one epoch at a time, with a device
synchronisation at each epoch end. Each number is the median of several repetitions of the whole
workload after a warm-up run, with min and max; variants run interleaved, in rotating order, so a
slow moment of the machine does not land on one variant only.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from launch.commands.bench.data import data_section
from launch.commands.bench.memory import memory_section
from launch.commands.bench.meshes import step_times
from launch.commands.bench.peers import peer_comparison
from launch.commands.bench.report import markdown, plot
from launch.commands.bench.sections import big_batch, crossover, ddp_world1, ddp_world2_cpu, overhead, sweep
from launch.commands.bench.workloads import SEED_SCALES, SWEEP_CONFIG, mlp_params

SECTIONS = ("sweep", "big", "overhead", "peers", "ddp", "data", "memory", "meshes", "corpus", "sft")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _sections(text: str) -> list[str]:
    import argparse

    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section {', '.join(unknown)} (any of {','.join(SECTIONS)})")
    return names


def add_arguments(p) -> None:
    p.add_argument("--out", default="bench_out", help="directory for bench.json, bench.md and bench.png (default: bench_out)")
    p.add_argument("--quick", action="store_true", help="a smoke test in well under a minute: tiny scales, 1-2 epochs, 2 repetitions; numbers are not meaningful")
    p.add_argument("--scales", type=_ints, help=f"sweep scales (default: the seeds' nine, {','.join(map(str, SEED_SCALES))}; trimmed by --budget-s on the CPU)")
    p.add_argument("--devices", help="comma-separated devices (default: cpu plus cuda or mps when present)")
    p.add_argument("--sections", type=_sections, default=None, help=f"any of {','.join(SECTIONS)} (default: all, and with --quick all but memory, corpus and sft); meshes times TP and HSDP against DDP and FSDP on CUDA (2+ GPUs); peers times PyTorch Lightning and Hugging Face Accelerate where installed")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each overhead/DDP measurement after one warm-up (default 5; the sweep uses min(3, reps))")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10, the seeds')")
    p.add_argument("--budget-s", type=float, default=300.0, help="time budget of the CPU sweep in seconds (default 300)")
    p.add_argument("--overhead-scales", type=_ints, help="scales for the overhead, peers and DDP comparisons (default 1,5; on an accelerator also 100)")
    p.add_argument("--big-batch", type=int, help="batch of the bf16 large-batch run (default 8192 on an accelerator, 256 on the CPU)")
    p.add_argument("--compile", action="store_true", help="also time train.compile=true (reduce-overhead on CUDA); on by default on CUDA")
    p.add_argument("--config", default=str(SWEEP_CONFIG), help="the workload at scale 1 (default configs/scale_sweep.yaml)")


def run(args) -> int:
    from launch.errors import EXIT_NONFINITE, EXIT_STOPPED

    try:
        return _run(args)
    except Exception as e:  # the in-process training loop stopped on purpose: Ctrl-C / SIGTERM, or a non-finite loss
        if getattr(e, "code", None) not in (EXIT_STOPPED, EXIT_NONFINITE):
            raise
        print(f"bench interrupted: {e}", file=sys.stderr)
        return e.code


def _run(args) -> int:
    from launch.errors import UserError

    if not Path(args.config).is_file():
        raise UserError(f"--config {args.config}: not found (the seeds' workload is configs/scale_sweep.yaml in the source tree)")
    accel = "cuda" if torch.cuda.is_available() else ("mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else None)
    devices = args.devices.split(",") if args.devices else ["cpu"] + ([accel] if accel else [])
    sections = set(args.sections or [s for s in SECTIONS if not (args.quick and s in ("memory", "corpus", "sft"))])
    if args.quick:
        scales, over_scales, epochs, reps, sweep_reps = args.scales or [1, 2], args.overhead_scales or [1], 2, 2, 2
    else:
        scales, over_scales, epochs, reps, sweep_reps = args.scales or SEED_SCALES, args.overhead_scales, args.epochs, args.reps, min(3, args.reps)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    res: dict = {
        "environment": {
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if accel == "cuda" else accel,
        },
        "config": {"file": str(args.config), "epochs": epochs, "reps": reps, "quick": args.quick, "devices": devices},
    }
    if "sweep" in sections:
        say("sweep (our loop, the seeds' workload):")
        res["sweep"] = []
        for dev in devices:
            res["sweep"] += sweep(args.config, scales, dev, sweep_reps, epochs, args.budget_s if dev == "cpu" else None, say)
        res["crossover"] = {dev: crossover(res["sweep"], dev) for dev in devices if dev != "cpu"}
    if "big" in sections:
        res["big_batch"] = []
        for dev in devices:
            measured = [r["scale"] for r in res.get("sweep", []) if r["device"] == dev and "wall_s" in r]
            scale = 1 if args.quick else (max(measured) if dev != "cpu" and measured else 2)
            batch = args.big_batch or (64 if args.quick else (8192 if dev != "cpu" else 256))
            say(f"large-batch bf16 on {dev}: scale {scale}, batch {batch}")
            res["big_batch"].append(big_batch(args.config, dev, scale, batch, 2 if args.quick else 3))
    if sections & {"overhead", "peers", "ddp"}:
        _comparisons(args, res, sections, devices, over_scales, reps, epochs, say)
    if "data" in sections:
        res["data"] = data_section(args.quick, reps, say)
    if "memory" in sections:
        res["memory"] = memory_section(devices, say)
    if "meshes" in sections:  # the GPU lane: NCCL step times of TP and HSDP against DDP and FSDP (records why not, without CUDA)
        res["meshes"] = step_times(say)
    if "corpus" in sections:
        from launch.commands.bench.corpus import corpus_section

        res["corpus"] = corpus_section(args.quick, say)
    if "sft" in sections:  # the fine-tuning data path: tokenization against the training step
        from launch.commands.bench.finetune import tokenization

        res["sft"] = tokenization(say)
    (out_dir / "bench.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out_dir / "bench.md").write_text(md + "\n")
    plotted = plot(res, out_dir / "bench.png") if any(res.get(k) for k in ("sweep", "overhead", "peers")) else False
    say("\n" + md)
    say(f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'}" + (f", {out_dir / 'bench.png'}" if plotted else ""))
    return 0


def _comparisons(args, res: dict, sections: set, devices: list[str], over_scales, reps: int, epochs: int, say) -> None:
    """The loop comparisons at a few scales per device: overhead, peers, DDP."""
    for key in ("overhead", "peers", "ddp"):
        if key in sections:
            res[key] = []
    for dev in devices:
        dev_scales = over_scales or ([1, 5] if dev == "cpu" else [1, 100])
        for scale in dev_scales:
            if "overhead" in sections:
                say(f"overhead on {dev}, scale {scale} ({mlp_params(scale):,} parameters)")
                res["overhead"].append(overhead(args.config, scale, dev, reps, epochs, args.compile or dev == "cuda"))
            if "peers" in sections:
                say(f"peers on {dev}, scale {scale}: our loop, the bare loop, the seeds' DataLoader loop, Lightning, Accelerate")
                res["peers"].append(peer_comparison(args.config, scale, dev, reps, epochs, say))
            if "ddp" in sections:
                say(f"DDP world size 1 vs none on {dev}, scale {scale}")
                res["ddp"].append(ddp_world1(args.config, scale, dev, reps, epochs))
        if "ddp" in sections and dev == "cpu":
            for scale in dev_scales:
                say(f"2 gloo processes vs 1 on the CPU, scale {scale}")
                res["ddp"].append(ddp_world2_cpu(args.config, scale, 1 if args.quick else min(3, reps), 1 if args.quick else epochs, warmup=not args.quick))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
