"""Streams that split themselves by rank: `stream.shard(rank=r, world_size=k)` returns the stream of
items r, r + k, r + 2k, ... of the whole stream (round-robin), so each rank reads only its share.

That is exactly the share launch.data.stream deals a rank when it reads the whole stream: with k ranks
at batch b, micro-step j covers the stream's positions [start + j*k*b, start + (j+1)*k*b), and any k*b
consecutive positions hold b of each residue modulo k. So DDP still equals one process at batch k*b,
and a resume at another world size (same global batch) is exact too: a rank replays its own shard up
to the resume point (no state is restored: each rank's would differ). Random choices inside the
stream are seeded by the item's position in the whole stream, as without sharding.

A rank cannot know where the other shards end, so the ranks trade their counts once per optimizer
step (one small all-reduce): the step's global count, whether it is the epoch's last, and a check that
the counts are the round-robin ones. A shard() that splits otherwise (whole files per rank, as
datasets' split_dataset_by_node does when the shard count divides the world size) is stopped with
one line as soon as the counts show it, instead of training on another order than one process would.
"""

from __future__ import annotations

import inspect
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from launch.data.loader import data_loader
from launch.data.types import Step, tree_map
from launch.errors import UserError
from launch.user_code import call


def shard_of(dataset, rank: int, world_size: int, where: str, debug: bool = False):
    """This rank's shard of a stream that offers shard(rank=, world_size=); None to read the whole stream."""
    fn = getattr(dataset, "shard", None)
    if world_size == 1 or not callable(fn):
        return None
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if "rank" not in params or "world_size" not in params:  # another contract (datasets' shard(num_shards, index))
        return None
    part = call(f"{where} shard(rank={rank}, world_size={world_size})", fn, rank=rank, world_size=world_size, debug=debug)
    if not hasattr(part, "__iter__"):
        raise UserError(f"{where}: shard(rank=, world_size=) returned a {type(part).__name__}, not a stream")
    return part


def _first(residue: int, start: int, k: int) -> int:
    return start + (residue - start) % k


def round_robin(start: int, count: int, k: int) -> list[int]:
    """Items of each rank among positions [start, start + count) when dealt round-robin."""
    return [len(range(_first(r, start, k), start + count, k)) for r in range(k)]


class _ShardSteps(IterableDataset):
    """This rank's items of each optimizer step, from its shard; worker w builds steps w, w+W, ..."""

    def __init__(self, part, spec: dict, reader):
        self.part, self.spec, self.reader = part, spec, reader

    def __iter__(self):
        s = self.spec
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        k, r, b, accum, start = s["world_size"], s["rank"], s["batch_size"], s["accum"], s["start"]
        per, collate = accum * k * b, s["collate"] or default_collate
        items = self.reader(self.part, s["seed"], s["epoch"], s["seed_samples"], place=lambda t: r + k * t)
        for _ in range(len(range(r, start, k))):  # replay: this rank's items before the resume point
            if next(items, None) is None:
                return
        pending, step = next(items, None), 0
        while pending is not None:
            lo = start + step * per
            micro = [[] for _ in range(accum)]
            while pending is not None and pending[0] < lo + per:
                micro[(pending[0] - lo) // (k * b)].append(pending[1])
                pending = next(items, None)
            if step % workers == worker:
                yield {"micro": [(collate(m) if m else None, len(m)) for m in micro], "more": pending is not None}
            step += 1


def _trade(counts: list[int], more: bool, rank: int, k: int, device: torch.device) -> tuple[torch.Tensor, bool]:
    """Every rank's counts per micro-step ([k, accum]) and whether any rank's shard goes on."""
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.zeros(k * len(counts) + 1, dtype=torch.float64, device=on)
    t[rank * len(counts) : (rank + 1) * len(counts)] = torch.tensor(counts, dtype=torch.float64)
    t[-1] = float(more)
    dist.all_reduce(t)
    t = t.cpu()
    return t[:-1].view(k, len(counts)).long(), bool(t[-1] > 0)


def sharded_steps(feeder, part, spec: dict, accum: int, reader) -> Iterator[Step]:
    """The epoch's optimizer steps for a sharded stream (feeder: the StreamFeeder; spec: its _spec;
    reader: launch.data.stream._reader)."""
    k, r, b, start = feeder.world_size, feeder.rank, feeder.batch_size, spec["start"]
    loader = iter(data_loader(_ShardSteps(part, spec, reader), feeder.cfg, r, feeder.device))
    stand_in: Optional[tuple] = None
    step = 0
    while True:
        packet = next(loader, None) or {"micro": [(None, 0)] * accum, "more": False}
        counts, more = _trade([n for _, n in packet["micro"]], packet["more"], r, k, feeder.device)
        totals = counts.sum(0).tolist()
        lo = start + step * accum * k * b
        for m, g in enumerate(totals):
            want = round_robin(lo + m * k * b, g, k)
            if counts[:, m].tolist() != want:
                raise UserError(f"{feeder.where}: its shard(rank, world_size) does not deal the stream round-robin (at item {lo + m * k * b} the ranks hold "
                                f"{counts[:, m].tolist()} items, round-robin gives {want}): the order would not be one process's")
        n_micro = sum(1 for g in totals if g)
        if n_micro == 0:
            return
        batches = []
        for batch, n in packet["micro"][:n_micro]:
            if batch is not None:
                batch = feeder._to_device(batch)
                stand_in = stand_in or tree_map(lambda t: t[:1], batch)
            batches.append((*(batch or stand_in or feeder.sample_batch(1)), n))
        yield Step(iter(batches), n_micro, sum(totals), lo + sum(totals), int(counts[r].sum()), not more)
        if not more:
            for _ in loader:
                pass
            return
        step += 1
