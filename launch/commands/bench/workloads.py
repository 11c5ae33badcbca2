"""What the bench times: the seeds' workload in our loop, a bare loop and the seeds' DataLoader loop, repeated interleaved."""

from __future__ import annotations

import contextlib
import gc
import io
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[3]
SWEEP_CONFIG = ROOT / "configs" / "scale_sweep.yaml"
SEED_SCALES = [1, 2, 3, 4, 5, 10, 50, 75, 100]  # the seeds' nine sizes: 90,902 ... 900,090,002 parameters
# The seeds' published numbers (Apple M2 Max, 10 epochs of the same workload), for the table.
SEEDS = {  # all nine of the seeds' sizes (shared/seeds/README.md)
    1: {"cpu": 0.5, "mps": 2.6}, 2: {"cpu": 0.8, "mps": 3.4}, 3: {"cpu": 1.8, "mps": 3.1},
    4: {"cpu": 2.4, "mps": 3.3}, 5: {"cpu": 3.4, "mps": 3.6}, 10: {"cpu": 7.5, "mps": 4.5},
    50: {"cpu": 147.9, "mps": 23.2}, 75: {"cpu": 337.2, "mps": 57.7}, 100: {"cpu": 575.2, "mps": 104.0},
}
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


def ours(cfg_path, overrides: list[str], device: str, keep_weights: bool = True) -> dict:
    """One run of the real launch.train.loop.train in this process; returns its epoch times (s), and with
    `keep_weights` its final weights (model.pt). The run's final checkpoint is written as always,
    after the last timed epoch, into a temporary directory removed afterwards."""
    from launch import config
    from launch.observe.logger import read_metrics
    from launch.processes.dist import DistEnv, setup
    from launch.train.loop import train

    with tempfile.TemporaryDirectory(prefix="launch-bench-") as tmp:
        cfg = config.load(str(cfg_path), [*overrides, f"run.dir={tmp}", f"train.device={device}", "ckpt.resume=never", "ckpt.every_epochs=0", "log.progress=false"])
        rt = setup(cfg, DistEnv("plain"))
        with contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            train(cfg, rt)
            wall = time.perf_counter() - t0
        records = read_metrics(Path(tmp))
        n = cfg.data.n_train
        weights = torch.load(Path(tmp) / "model.pt", map_location="cpu") if keep_weights else None
    # samples_per_s is the loop's own clock: samples seen in the epoch / (epoch start -> end-of-epoch agreement).
    return {"epochs": [n / r["samples_per_s"] for r in records], "wall": wall, "weights": weights}


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order our loop documents (launch/data/order.py): DistributedSampler's shuffle,
    randperm(n) seeded with seed + epoch. Should the loop's order change, the overhead section's
    bitwise weight comparison says so."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g)


def workload(cfg_path, overrides, device):
    """The same data, initial weights and hyper-parameters launch.train.loop.train would use. The one
    place the bench reaches past the core's public surface (launch.config, launch.train.loop.train):
    launch.data.build and launch.models.build build them exactly as the loop does."""
    from launch import config
    from launch.data.build import build_data as build
    from launch.models.build import build_model

    cfg = config.load(str(cfg_path), overrides)
    data = build(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, data.in_features, data.num_classes).to(device)
    return cfg, data.train.x, data.train.y, model


def bare(cfg_path, overrides: list[str], device: str) -> dict:
    """A minimal hand-written loop: data on the device, one shuffled index slice per batch.
    It visits samples in the same order as our loop (so final weights must agree)."""
    dev = torch.device(device)
    cfg, x, y, model = workload(cfg_path, overrides, dev)
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
    cfg, x, y, model = workload(cfg_path, overrides, dev)
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


def our_bare_and_seed_loops(cfg_path, device: str) -> dict:
    """The three loops every comparison times: ours, the bare loop and the seeds' DataLoader loop."""
    return {
        "launch": lambda o: ours(cfg_path, o, device),
        "bare": lambda o: bare(cfg_path, o, device),
        "seed_dataloader": lambda o: seed_loop(cfg_path, o, device),
    }


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


def loop_table(res: dict[str, dict], cfg_path, overrides: list[str], epochs: int) -> dict[str, dict]:
    """`repeat`'s result as the bench reports it: per loop, the stats, ms per step and the ratio
    to the bare loop (the first run's raw result is dropped; our loop keeps its whole call's wall)."""
    from launch import config

    cfg = config.load(str(cfg_path), overrides)
    steps = math.ceil(cfg.data.n_train / cfg.data.batch_size) * epochs
    loops = {}
    for name, r in res.items():
        first = r.pop("first")
        r["ms_per_step"] = 1000 * r["median"] / steps
        r["vs_bare"] = r["median"] / res["bare"]["median"]
        if name == "launch":
            r["train_call_wall_s"] = first["wall"]  # the whole train() call of the first timed run: setup, eval, checkpoints too
        loops[name] = r
    return loops
