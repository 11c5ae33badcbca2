"""The bench's data section: what per-sample seeding costs, and what the epoch order costs in memory.

- Seeding (launch.data.seeding): microseconds per sample to seed torch, random and numpy before a
  sample is loaded, in a DataLoader worker (seed only) and in the main process (the training streams
  saved and restored around it as well), next to loading a trivial sample without it.
- The epoch order at 20M samples: resident memory a rank adds for its epoch (the int32 permutation
  and the batch-by-batch DataLoader index lists), measured in a fresh process, next to the whole-epoch
  Python index lists the launcher used to build (about 76 bytes per sample).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from launch.commands.bench.workloads import stats

_ORDER_PROBE = r"""
import json, sys, psutil, torch
from torch.utils.data import Dataset
from launch import config
from launch.data.feeder import Feeder
from launch.data.order import epoch_permutation
from launch.data.types import Split
n, how = int(sys.argv[1]), sys.argv[2]
class Sized(Dataset):
    def __len__(self): return n
    def __getitem__(self, i): return torch.zeros(1), 0
cfg = config.load(None, ["train.device=cpu", "data.seed_samples=false"])
feeder = Feeder(Split(dataset=Sized()), cfg, torch.device("cpu"), 0, 1, 64)
proc = psutil.Process()
before = proc.memory_info().rss
if how == "ours":
    it = feeder.train_epoch(0, 0)
    for _ in range(100): next(it)
else:  # the whole epoch's index lists, as before
    lists = [c.tolist() for c in epoch_permutation(n, 0, 0).long().split(64)]
print(json.dumps({"added_mb": (proc.memory_info().rss - before) / 2**20}))
"""

def _per_sample_us(fn, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t) / n * 1e6


def seeding_cost(reps: int, n: int = 20000) -> dict:
    import torch

    from launch.data.seeding import SeededDataset
    from launch.train.randomness import mix, seed_cpu

    class Trivial:
        def __getitem__(self, i):
            return torch.zeros(4), 0

    seeded = SeededDataset(Trivial(), 0)
    raw, worker, main = [], [], []
    for _ in range(reps):
        raw.append(_per_sample_us(lambda i: Trivial()[i], n))
        worker.append(_per_sample_us(lambda i: (seed_cpu(mix(0, 0, i)), Trivial()[i]), n))
        main.append(_per_sample_us(lambda i: seeded[(0, i)], n))
    return {"samples": n, "load_us": stats(raw), "seeded_in_worker_us": stats(worker), "seeded_in_main_process_us": stats(main)}


def order_memory(n: int) -> dict:
    out = {"samples": n}
    for how in ("ours", "whole_epoch_lists"):
        p = subprocess.run([sys.executable, "-c", _ORDER_PROBE, str(n), how], capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            out[how] = {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
            continue
        mb = json.loads(p.stdout)["added_mb"]
        out[how] = {"added_mb": round(mb, 1), "bytes_per_sample": round(mb * 2**20 / n, 2)}
    return out


def data_section(quick: bool, reps: int, say) -> dict:
    n = 200_000 if quick else 20_000_000
    say(f"data: per-sample seeding cost; epoch order memory at {n:,} samples")
    return {"seeding": seeding_cost(2 if quick else reps, 2000 if quick else 20000), "order": order_memory(n)}


def markdown(d: dict) -> list[str]:
    s, o = d["seeding"], d["order"]
    us = lambda k: f"{s[k]['median']:.1f} us"  # noqa: E731
    lines = ["### Data path", "",
             f"Per-sample seeding (data.seed_samples, {s['samples']:,} samples): loading a trivial sample {us('load_us')}; "
             f"seeded in a DataLoader worker {us('seeded_in_worker_us')}; in the main process (streams saved and restored too) {us('seeded_in_main_process_us')}.", ""]
    cells = [f"{how.replace('_', ' ')}: " + (f"{o[how]['added_mb']} MB ({o[how]['bytes_per_sample']} bytes/sample)" if "added_mb" in o[how] else o[how]["error"])
             for how in ("ours", "whole_epoch_lists")]
    lines += [f"Epoch order of one rank at {o['samples']:,} samples, resident memory added: " + "; ".join(cells) + ".", ""]
    return lines
