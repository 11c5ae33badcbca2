"""The bench's sections: the sweep over the seeds' sizes, large-batch throughput, loop overhead, DDP overhead."""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from launch.commands.bench.workloads import ROOT, loop_table, mlp_params, n_train, our_bare_and_seed_loops, ours, peak_tflops, repeat, scale_overrides, stats, warm


def sweep(cfg_path, scales, device: str, reps: int, epochs: int, budget_s: float | None, say) -> list[dict]:
    """Our loop on the seeds' workload at each scale. With a budget (the CPU), a scale whose
    predicted cost (time grows at most in proportion to the parameter count) would not fit is
    run with fewer repetitions, or skipped with the reason recorded."""
    from launch.errors import EXIT_NONFINITE

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
            res = repeat({"ours": lambda o: ours(cfg_path, o, device, keep_weights=False)}, n_reps, ov, warm(cfg_path, scale))["ours"]
        except Exception as e:  # a diverging workload (the loop stops with EXIT_NONFINITE) is reported, not timed
            if getattr(e, "code", None) != EXIT_NONFINITE:
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
    out = ours(cfg_path, ov, device, keep_weights=False)
    per_epoch = stats(out["epochs"][1:])
    sps = 4 * batch / per_epoch["median"]
    tflops = 6 * mlp_params(scale) * sps / 1e12
    peak = peak_tflops(torch.device(device), "bf16")
    return {"device": device, "scale": scale, "params": mlp_params(scale), "batch": batch, "epoch_s": per_epoch, "samples_per_s": sps, "tflops": tflops, "peak_fraction": tflops / peak if peak else None}


def overhead(cfg_path, scale: int, device: str, reps: int, epochs: int, compile_variant: bool) -> dict:
    ov = [*scale_overrides(cfg_path, scale), f"train.epochs={epochs}"]
    variants = our_bare_and_seed_loops(cfg_path, device)
    if compile_variant:
        mode = "reduce-overhead" if device.startswith("cuda") else "default"
        variants[f"launch_compile_{mode}"] = lambda o: ours(cfg_path, [*o, "train.compile=true", f"train.compile_mode={mode}"], device)
    res = repeat(variants, reps, ov, warm(cfg_path, scale))
    wa, wb = res["launch"]["first"]["weights"], res["bare"]["first"]["weights"]
    same = wa.keys() == wb.keys() and all(torch.equal(wa[k].cpu(), wb[k].cpu()) for k in wa)
    loops = loop_table(res, cfg_path, ov, epochs)
    out = {"scale": scale, "params": mlp_params(scale), "device": device, "epochs": epochs, "launch_equals_bare_weights": same, "loops": loops}
    return out


def ddp_world1(cfg_path, scale: int, device: str, reps: int, epochs: int) -> dict:
    """Our loop at world size 1, wrapped in DDP (a real one-rank process group) vs not."""
    from launch import config
    from launch.observe.logger import read_metrics
    from launch.processes.dist import DistEnv, free_port, setup, teardown
    from launch.train.loop import train

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
    from launch.observe.logger import read_metrics

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
