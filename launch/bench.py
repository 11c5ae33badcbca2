"""`launch bench`: the seeds' MLP sweep, loop overhead and DDP overhead -> bench.json, bench.md, bench.png.

What is timed, everywhere: the training epochs only (data iteration, forward, backward, optimizer
step, and for our loop its per-step bookkeeping and periodic agreement), never process start-up,
model construction, evaluation or checkpoint writing. Our loop is the real `launch.loop.train`,
called in-process; its own epoch timer (recorded as samples_per_s in metrics.jsonl) gives the
epoch times. The other loops are timed the same way, one epoch at a time, with a device
synchronisation at each epoch end. Each number is the median of several repetitions of the whole
workload after a warm-up run, with min and max; variants run interleaved, in rotating order, so a
slow moment of the machine does not land on one variant only.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SWEEP_CONFIG = ROOT / "configs" / "scale_sweep.yaml"
SEED_SCALES = [1, 2, 5, 10, 20, 30, 50, 75, 100]  # 90,902 ... 900,090,002 parameters
# The seeds' published numbers (Apple M2 Max, 10 epochs of the same workload), for the table.
SEEDS = {1: {"cpu": 0.5, "mps": 2.6}, 100: {"cpu": 575.0, "mps": 104.0}}
SEEDS_CROSSOVER = 3e6
# Dense peak TFLOP/s by device name (fp32 without TF32, bf16 tensor cores); None where unknown (CPUs).
PEAKS = {"H100 PCIe": (51.0, 756.0), "H100": (67.0, 989.0), "H200": (67.0, 989.0), "A100": (19.5, 312.0), "L4": (30.3, 121.0)}


def mlp_params(scale: int) -> int:
    i, h1, h2 = 100 * scale, 300 * scale, 200 * scale
    return i * h1 + h1 + h1 * h2 + h2 + h2 * 2 + 2


def scale_overrides(cfg_path, scale: int) -> list[str]:
    """The widths at `scale`, and the learning rate divided by the scale: with random labels the
    seeds' lr 0.5 sends the loss to NaN from scale 10 (after 650 steps on this CPU), and our loop
    stops on a non-finite loss. The largest stable SGD step shrinks with the width; the work per
    step does not depend on it."""
    from launch import config

    lr = config.load(str(cfg_path)).train.lr / scale
    return [f"data.features={100 * scale}", f"model.hidden=[{300 * scale},{200 * scale}]", f"train.lr={lr}"]


def warm(cfg_path, scale: int) -> list[str]:
    """Overrides of the warm-up run: one epoch at the same size."""
    return [*scale_overrides(cfg_path, scale), "train.epochs=1"]


def n_train(cfg_path) -> int:
    from launch import config

    return config.load(str(cfg_path)).data.n_train


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_tflops(device: torch.device, precision: str):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (fp32, bf16) in PEAKS.items():
        if key in name:
            return bf16 if precision in ("bf16", "fp16") else fp32
    return None


# --------------------------------------------------------------------------- the loops compared


def ours(cfg_path, overrides: list[str], device: str, write_checkpoints: bool = True) -> dict:
    """One run of the real launch.loop.train in this process; returns its epoch times (s)."""
    from launch import checkpoint, config
    from launch.dist import DistEnv, setup
    from launch.logger import read_metrics
    from launch.loop import train

    with tempfile.TemporaryDirectory(prefix="launch-bench-") as tmp:
        cfg = config.load(str(cfg_path), [*overrides, f"run.dir={tmp}", f"train.device={device}", "ckpt.resume=never", "ckpt.every_epochs=0", "log.progress=false"])
        rt = setup(cfg, DistEnv("plain"))
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            if not write_checkpoints:  # multi-GB final checkpoints of big models: written after the timing, and not needed here
                stack.enter_context(_patched(checkpoint, save=lambda *a, **k: Path(tmp) / "skipped", atomic_write=lambda *a, **k: None))
            t0 = time.perf_counter()
            train(cfg, rt)
            wall = time.perf_counter() - t0
        records = read_metrics(Path(tmp))
        n = cfg.data.n_train
        weights = torch.load(Path(tmp) / "model.pt", map_location="cpu") if write_checkpoints else None
    # samples_per_s is the loop's own clock: samples seen in the epoch / (epoch start -> end-of-epoch agreement).
    return {"epochs": [n / r["samples_per_s"] for r in records], "wall": wall, "weights": weights}


@contextlib.contextmanager
def _patched(module, **attrs):
    saved = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


def _workload(cfg_path, overrides, device):
    """The same data, initial weights and hyper-parameters launch.loop.train would use."""
    from launch import config
    from launch.data import build
    from launch.model import build_model

    cfg = config.load(str(cfg_path), overrides)
    data = build(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, data.in_features, data.num_classes).to(device)
    return cfg, data.train.x, data.train.y, model


def bare(cfg_path, overrides: list[str], device: str) -> dict:
    """A minimal hand-written loop: data on the device, one shuffled index slice per batch.
    It visits samples in the same order as our loop (so final weights must agree)."""
    from launch.data import epoch_permutation

    dev = torch.device(device)
    cfg, x, y, model = _workload(cfg_path, overrides, dev)
    x, y = x.to(dev), y.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    b, n, times = cfg.data.batch_size, len(y), []
    for epoch in range(cfg.train.epochs):
        t0 = time.perf_counter()
        perm = epoch_permutation(n, cfg.train.seed, epoch).to(dev)
        for i in range(0, n, b):
            idx = perm[i : i + b]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return {"epochs": times, "weights": {k: v.cpu() for k, v in model.state_dict().items()}}


def seed_loop(cfg_path, overrides: list[str], device: str) -> dict:
    """The seeds' loop: a TensorDataset on the host through a shuffling DataLoader
    (per-sample __getitem__ and collate), each batch copied to the device."""
    from torch.utils.data import DataLoader, TensorDataset

    dev = torch.device(device)
    cfg, x, y, model = _workload(cfg_path, overrides, dev)
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.data.batch_size, shuffle=True, generator=torch.Generator().manual_seed(cfg.train.seed))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    times = []
    for _ in range(cfg.train.epochs):
        t0 = time.perf_counter()
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb.to(dev)), yb.to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return {"epochs": times}


def repeat(variants: dict, reps: int, timed: list[str], warmup: list[str] | None) -> dict[str, dict]:
    """Each variant is a function of the config overrides. Warm each up once on `warmup`, then run
    all `reps` times on `timed`, interleaved in rotating order. Returns per variant: stats of the
    summed epoch times, plus the first timed run's raw result."""
    names = list(variants)
    for name in names if warmup is not None else ():
        variants[name](warmup)
    totals: dict[str, list[float]] = {name: [] for name in names}
    first: dict[str, dict] = {}
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            gc.collect()
            out = variants[name](timed)
            totals[name].append(sum(out["epochs"]))
            first.setdefault(name, out)
    return {name: {**stats(totals[name]), "first": first[name]} for name in names}


# --------------------------------------------------------------------------- sections


def sweep(cfg_path, scales, device: str, reps: int, epochs: int, budget_s: float | None, say) -> list[dict]:
    """Our loop on the seeds' workload at each scale. With a budget (the CPU), a scale whose
    predicted cost (time grows at most in proportion to the parameter count) would not fit is
    run with fewer repetitions, or skipped with the reason recorded."""
    from launch.errors import EXIT_NONFINITE
    from launch.loop import Stopped

    rows, spent, last = [], 0.0, None
    dev = torch.device(device)
    for scale in scales:
        params = mlp_params(scale)
        ov = [*scale_overrides(cfg_path, scale), f"train.epochs={epochs}"]
        n_reps = reps
        if budget_s is not None and last is not None:
            per_run = last["median"] * params / last["params"]
            left = budget_s - spent
            n_reps = min(reps, int(left / (per_run * (1 + 1 / epochs))))
            if n_reps < 1:
                rows.append({"scale": scale, "params": params, "device": device, "skipped": f"predicted {per_run:.0f} s per run, {max(left, 0):.0f} s of the {budget_s:.0f} s budget left"})
                say(f"  {device} scale {scale}: skipped (time budget)")
                continue
        t0 = time.perf_counter()
        try:
            res = repeat({"ours": lambda o: ours(cfg_path, o, device, write_checkpoints=False)}, n_reps, ov, warm(cfg_path, scale))["ours"]
        except Stopped as e:  # a diverging workload is reported, not timed
            if e.code != EXIT_NONFINITE:
                raise
            rows.append({"scale": scale, "params": params, "device": device, "skipped": str(e)})
            say(f"  {device} scale {scale}: {e}")
            continue
        finally:
            spent += time.perf_counter() - t0
        res.pop("first")
        samples = n_train(cfg_path) * epochs
        sps = samples / res["median"]
        tflops = 6 * params * sps / 1e12
        peak = peak_tflops(dev, "fp32")
        row = {"scale": scale, "params": params, "device": device, "wall_s": res, "samples_per_s": sps, "tflops": tflops, "peak_fraction": tflops / peak if peak else None}
        rows.append(row)
        last = {"median": res["median"], "params": params}
        say(f"  {device} scale {scale} ({params:,} params): {res['median']:.2f} s [{res['min']:.2f}, {res['max']:.2f}] x{res['n']}, {tflops:.4f} TFLOP/s")
    return rows


def crossover(rows: list[dict], accel: str):
    """Parameter count where the accelerator's time drops below the CPU's (log-log interpolation)."""
    t = {(r["device"], r["scale"]): r["wall_s"]["median"] for r in rows if "wall_s" in r}
    both = sorted((mlp_params(s), t[("cpu", s)] / t[(accel, s)]) for (d, s) in t if d == "cpu" and (accel, s) in t)
    if not both:
        return {"params": None, "note": "no size measured on both devices"}
    if both[0][1] >= 1:
        return {"params": None, "note": f"the {accel} is faster at every measured size (from {both[0][0]:,} parameters)"}
    for (p0, r0), (p1, r1) in zip(both, both[1:]):
        if r1 >= 1:
            f = -math.log(r0) / (math.log(r1) - math.log(r0))
            p = math.exp(math.log(p0) + f * (math.log(p1) - math.log(p0)))
            return {"params": p, "note": f"between {p0:,} and {p1:,} parameters"}
    return {"params": None, "note": f"the CPU is still faster at {both[-1][0]:,} parameters, the largest size measured on both"}


def big_batch(cfg_path, device: str, scale: int, batch: int, reps: int) -> dict:
    """bf16 autocast at a large batch: how close our loop gets to the device's limit.
    4 steps per epoch; the first epoch is the warm-up, the next `reps` are the repetitions."""
    ov = [*scale_overrides(cfg_path, scale), "train.precision=bf16", f"data.batch_size={batch}", f"data.n_train={4 * batch}", f"train.epochs={1 + reps}", "data.n_eval=16"]
    out = ours(cfg_path, ov, device, write_checkpoints=False)
    per_epoch = stats(out["epochs"][1:])
    sps = 4 * batch / per_epoch["median"]
    tflops = 6 * mlp_params(scale) * sps / 1e12
    peak = peak_tflops(torch.device(device), "bf16")
    return {"device": device, "scale": scale, "params": mlp_params(scale), "batch": batch, "epoch_s": per_epoch, "samples_per_s": sps, "tflops": tflops, "peak_fraction": tflops / peak if peak else None}


def overhead(cfg_path, scale: int, device: str, reps: int, epochs: int, compile_variant: bool) -> dict:
    ov = [*scale_overrides(cfg_path, scale), f"train.epochs={epochs}"]
    variants = {
        "launch": lambda o: ours(cfg_path, o, device),
        "bare": lambda o: bare(cfg_path, o, device),
        "seed_dataloader": lambda o: seed_loop(cfg_path, o, device),
    }
    if compile_variant:
        mode = "reduce-overhead" if device.startswith("cuda") else "default"
        variants[f"launch_compile_{mode}"] = lambda o: ours(cfg_path, [*o, "train.compile=true", f"train.compile_mode={mode}"], device)
    res = repeat(variants, reps, ov, warm(cfg_path, scale))
    wa, wb = res["launch"]["first"]["weights"], res["bare"]["first"]["weights"]
    same = wa.keys() == wb.keys() and all(torch.equal(wa[k].cpu(), wb[k].cpu()) for k in wa)
    from launch import config

    cfg = config.load(str(cfg_path), ov)
    steps = math.ceil(cfg.data.n_train / cfg.data.batch_size) * epochs
    out = {"scale": scale, "params": mlp_params(scale), "device": device, "epochs": epochs, "launch_equals_bare_weights": same, "loops": {}}
    for name, r in res.items():
        first = r.pop("first")
        r["ms_per_step"] = 1000 * r["median"] / steps
        r["vs_bare"] = r["median"] / res["bare"]["median"]
        if name == "launch":
            r["train_call_wall_s"] = first["wall"]  # the whole train() call of the first timed run: setup, eval, checkpoints too
        out["loops"][name] = r
    return out


def ddp_world1(cfg_path, scale: int, device: str, reps: int, epochs: int) -> dict:
    """Our loop at world size 1, wrapped in DDP (a real one-rank process group) vs not."""
    from launch.dist import DistEnv, free_port, setup, teardown
    from launch import config
    from launch.loop import train
    from launch.logger import read_metrics

    ov = [*scale_overrides(cfg_path, scale), f"train.epochs={epochs}"]
    cfg0 = config.load(str(cfg_path), [*ov, f"train.device={device}"])
    rt = setup(cfg0, DistEnv("spawn", 0, 0, 1, 1, "127.0.0.1", free_port()))

    def wrapped(overrides) -> dict:
        with tempfile.TemporaryDirectory(prefix="launch-bench-") as tmp, contextlib.redirect_stdout(io.StringIO()):
            cfg = config.load(str(cfg_path), [*overrides, f"run.dir={tmp}", f"train.device={device}", "ckpt.resume=never", "ckpt.every_epochs=0", "log.progress=false"])
            train(cfg, rt)
            return {"epochs": [cfg.data.n_train / r["samples_per_s"] for r in read_metrics(Path(tmp))]}

    try:
        res = repeat({"no_ddp": lambda o: ours(cfg_path, o, device), "ddp_world_1": wrapped}, reps, ov, warm(cfg_path, scale))
    finally:
        teardown(rt)
    for r in res.values():
        r.pop("first")
    return {"scale": scale, "device": device, "backend": rt.backend, "no_ddp": res["no_ddp"], "ddp_world_1": res["ddp_world_1"], "ratio": res["ddp_world_1"]["median"] / res["no_ddp"]["median"]}


def ddp_world2_cpu(cfg_path, scale: int, reps: int, epochs: int, warmup: bool = True) -> dict:
    """CPU: two gloo processes at half the batch each vs one process, same global batch (10).
    Both timed by the loop's own epoch clock; the 2-process runs are real `train_ddp.py --nproc 2`."""
    from launch.logger import read_metrics

    ov = [*scale_overrides(cfg_path, scale), f"train.epochs={epochs}"]

    def two(overrides) -> dict:
        with tempfile.TemporaryDirectory(prefix="launch-bench-") as tmp:
            cmd = [sys.executable, str(ROOT / "train_ddp.py"), "--nproc", "2", "--config", str(cfg_path), *overrides, "data.batch_size=5", f"run.dir={tmp}", "train.device=cpu", "ckpt.every_epochs=0", "log.progress=false"]
            env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(f"train_ddp.py --nproc 2 failed ({p.returncode}): {p.stderr.strip()[-500:]}")
            return {"epochs": [n_train(cfg_path) / r["samples_per_s"] for r in read_metrics(Path(tmp))]}

    res = repeat({"world_1": lambda o: ours(cfg_path, o, "cpu"), "world_2_gloo": two}, reps, ov, warm(cfg_path, scale) if warmup else None)
    for r in res.values():
        r.pop("first")
    return {"scale": scale, "global_batch": 10, "world_1": res["world_1"], "world_2_gloo": res["world_2_gloo"], "ratio": res["world_2_gloo"]["median"] / res["world_1"]["median"]}


# --------------------------------------------------------------------------- output


def _span(s: dict, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}, {fmt.format(s['max'])}] (n={s['n']})"


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
        lines += ["### Loop overhead (same model, data, seed and device; training epochs only)", "",
                  "| scale | device | loop | train s: median [min, max] | ms/step | x bare loop |", "|---:|---|---|---|---:|---:|"]
        for o in res["overhead"]:
            for name, r in o["loops"].items():
                lines.append(f"| {o['scale']} | {o['device']} | {name} | {_span(r)} | {r['ms_per_step']:.3f} | **{r['vs_bare']:.3f}** |")
        same = ", ".join(f"scale {o['scale']} {o['device']}: {'yes' if o['launch_equals_bare_weights'] else 'NO'}" for o in res["overhead"])
        lines += ["", f"Final weights of our loop and the bare loop bitwise identical (same computation): {same}.", ""]
    if res.get("ddp"):
        lines += ["### DDP overhead (training epochs only)", "", "| comparison | scale | baseline s | DDP s | ratio |", "|---|---:|---|---|---:|"]
        for d in res["ddp"]:
            if "ddp_world_1" in d:
                lines.append(f"| world size 1 in DDP ({d['backend']}) vs no DDP, {d['device']} | {d['scale']} | {_span(d['no_ddp'])} | {_span(d['ddp_world_1'])} | **{d['ratio']:.3f}** |")
            else:
                lines.append(f"| 2 gloo processes (batch 5 each) vs 1 process (batch 10), CPU | {d['scale']} | {_span(d['world_1'])} | {_span(d['world_2_gloo'])} | **{d['ratio']:.3f}** |")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> bool:
    """Wall time vs parameters per device (medians; min and max are in the table), with the seeds'
    points, drawn by launch.plot's line_plot. matplotlib is an optional extra."""
    from launch.errors import UserError
    from launch.plot import line_plot

    series = {}
    for dev in sorted({r["device"] for r in res.get("sweep", [])}):
        pts = [(r["params"], r["wall_s"]["median"]) for r in res["sweep"] if r["device"] == dev and "wall_s" in r]
        if pts:
            series[f"this machine: {dev} (launch loop)"] = tuple(zip(*pts))
    for dev, marker in (("cpu", "s"), ("mps", "^")):
        seeds = ([mlp_params(s) for s in SEEDS], [SEEDS[s][dev] for s in SEEDS])
        series[f"seeds, M2 Max: {dev.upper()}"] = (*seeds, {"marker": marker, "linestyle": "--", "color": "grey", "alpha": 0.7})
    try:
        line_plot(
            series, path, title="The seeds' sweep: batch 10, SGD, fp32", xlabel="MLP parameters",
            ylabel=f"seconds for {res['config']['epochs']} epochs of 1000 samples", logx=True, logy=True,
        )
    except UserError as e:
        print(f"note: no plot ({e})", file=sys.stderr)
        return False
    return True


# --------------------------------------------------------------------------- command


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def add_arguments(p) -> None:
    p.add_argument("--out", default="bench_out", help="directory for bench.json, bench.md and bench.png (default: bench_out)")
    p.add_argument("--quick", action="store_true", help="a smoke test in well under a minute: tiny scales, 1-2 epochs, 2 repetitions; numbers are not meaningful")
    p.add_argument("--scales", type=_ints, help=f"sweep scales (default: the seeds' nine, {','.join(map(str, SEED_SCALES))}; trimmed by --budget-s on the CPU)")
    p.add_argument("--devices", help="comma-separated devices (default: cpu plus cuda or mps when present)")
    p.add_argument("--sections", default="sweep,big,overhead,ddp", help="any of sweep,big,overhead,ddp (default: all)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each overhead/DDP measurement after one warm-up (default 5; the sweep uses min(3, reps))")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10, the seeds')")
    p.add_argument("--budget-s", type=float, default=300.0, help="time budget of the CPU sweep in seconds (default 300)")
    p.add_argument("--overhead-scales", type=_ints, help="scales for the overhead and DDP comparisons (default 1,5; on an accelerator also 100)")
    p.add_argument("--big-batch", type=int, help="batch of the bf16 large-batch run (default 8192 on an accelerator, 256 on the CPU)")
    p.add_argument("--compile", action="store_true", help="also time train.compile=true (reduce-overhead on CUDA); on by default on CUDA")
    p.add_argument("--config", default=str(SWEEP_CONFIG), help="the workload at scale 1 (default configs/scale_sweep.yaml)")


def run(args) -> int:
    from launch.loop import Stopped

    try:
        return _run(args)
    except Stopped as e:  # Ctrl-C / SIGTERM reach the in-process training loop, which stops at its next agreement
        print(f"bench interrupted: {e}", file=sys.stderr)
        return e.code


def _run(args) -> int:
    from launch.errors import UserError

    if not Path(args.config).is_file():
        raise UserError(f"--config {args.config}: not found (the seeds' workload is configs/scale_sweep.yaml in the source tree)")
    accel = "cuda" if torch.cuda.is_available() else ("mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else None)
    devices = args.devices.split(",") if args.devices else ["cpu"] + ([accel] if accel else [])
    sections = set(args.sections.split(","))
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
    if "overhead" in sections or "ddp" in sections:
        res["overhead"], res["ddp"] = [], []
        for dev in devices:
            dev_scales = over_scales or ([1, 5] if dev == "cpu" else [1, 100])
            for scale in dev_scales:
                if "overhead" in sections:
                    say(f"overhead on {dev}, scale {scale} ({mlp_params(scale):,} parameters)")
                    res["overhead"].append(overhead(args.config, scale, dev, reps, epochs, args.compile or dev == "cuda"))
                if "ddp" in sections:
                    say(f"DDP world size 1 vs none on {dev}, scale {scale}")
                    res["ddp"].append(ddp_world1(args.config, scale, dev, reps, epochs))
            if "ddp" in sections and dev == "cpu":
                for scale in dev_scales:
                    say(f"2 gloo processes vs 1 on the CPU, scale {scale}")
                    res["ddp"].append(ddp_world2_cpu(args.config, scale, 1 if args.quick else min(3, reps), 1 if args.quick else epochs, warmup=not args.quick))
    (out_dir / "bench.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out_dir / "bench.md").write_text(md + "\n")
    plotted = plot(res, out_dir / "bench.png") if res.get("sweep") else False
    say("\n" + md)
    say(f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'}" + (f", {out_dir / 'bench.png'}" if plotted else ""))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
