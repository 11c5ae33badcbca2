"""Feeds a corpus split in its epoch order (launch.data.corpus.order): the Feeder interface of
launch.data.feeder (epoch_steps, eval_batches, sample_batch, state) for a CorpusSplit.

Work is done a block at a time: a block job decodes this rank's run of the block's units and lays
out its micro-batches; with data.num_workers=W, worker w does blocks w, w+W, ... and the DataLoader
hands them over in order (a worker decodes only its blocks' units). Evaluation: rank r takes a
contiguous 1/k of the split (canonical order), so it decodes 1/k of it too; its samples keep their
split index for metrics that gather predictions in sample order (`eval_ids`).

The checkpoint's stream_state holds the corpus record (file names, sizes, rows, fingerprints):
a resume on other files is refused in one line, or with data.accept_corpus_change=true accepted,
the interrupted epoch starting its order afresh on the new files.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from launch.data.corpus.index import changes, say
from launch.data.corpus.order import EpochOrder, auto_window
from launch.data.loader import data_loader
from launch.data.order import steps_per_epoch
from launch.data.types import Step, tree_map
from launch.errors import UserError


class _Jobs(IterableDataset):
    """Worker w of W runs jobs w, w+W, ...; the DataLoader returns their results in job order."""

    def __init__(self, fn, jobs: list):
        self.fn, self.jobs = fn, jobs

    def __iter__(self):
        info = get_worker_info()
        w, workers = (info.id, info.num_workers) if info else (0, 1)
        for job in self.jobs[w::workers]:
            yield self.fn(job)


class _BlockJob:
    """Lays out this rank's part of a training block (a picklable callable: workers may be spawned)."""

    def __init__(self, feeder, order: EpochOrder, block0: int, round0: int):
        self.feeder, self.order, self.block0, self.round0 = feeder, order, block0, round0

    def __call__(self, block: int) -> dict:
        ranges, micro = self.order.plan(block, self.feeder.rank, self.feeder.k, self.round0 if block == self.block0 else 0)
        return self.feeder._job((ranges, micro, self.order.pieces))


class _EvalJob:
    """Lays out evaluation positions [a, z) of the split in batches."""

    def __init__(self, feeder):
        self.feeder = feeder

    def __call__(self, span: tuple) -> dict:
        a, z = span
        b = self.feeder.b
        micro = [(np.arange(s - a, min(z, s + b) - a), min(b, z - s)) for s in range(a, z, b)]
        return self.feeder._job(([span], micro, self.feeder.split.canonical_positions))


class CorpusFeeder:
    in_memory = False
    counted = True  # False: a copy of another rank's share (launch.data.feeder.make_feeder)

    def __init__(self, split, cfg, device: torch.device, rank: int, world_size: int, batch_size: int):
        self.split, self.cfg, self.device = split, cfg, device
        self.rank, self.k, self.b = rank, world_size, batch_size
        self.world_size = world_size
        self.M, self.n = world_size * batch_size, len(split)
        bytes_per = split.source.maker.sample_bytes()
        self.window = max(self.M, (split.window // self.M) * self.M) if split.window else auto_window(split.samples, bytes_per, self.M)
        self.restart = False  # the corpus changed under a resume and that was accepted: the epoch starts afresh
        self.decoded_bytes = 0  # bytes this rank decoded (in its workers too)
        self.eval_first = 0

    # ------------------------------------------------------------------ the resume record
    @property
    def state(self) -> dict:
        return {"corpus": self.split.record}

    @state.setter
    def state(self, saved) -> None:
        old = (saved or {}).get("corpus") if isinstance(saved, dict) else None
        if not old:
            return
        diff = [f"{name}: {c}" for name in ("train", "eval") for c in changes(old.get(name, {}), self.split.record.get(name, {}))]
        if not diff:
            return
        shown = "; ".join(diff[:3]) + (f"; {len(diff) - 3} more" if len(diff) > 3 else "")
        if not self.cfg.data.accept_corpus_change:
            raise UserError(f"the corpus changed since the checkpoint ({shown}): resuming would continue an order over other files; "
                            "set data.accept_corpus_change=true to resume on these files, starting the interrupted epoch's order afresh")
        self.restart = True
        say(f"the corpus changed since the checkpoint ({shown}); data.accept_corpus_change=true: the interrupted epoch starts its order afresh")

    # ------------------------------------------------------------------ training
    def _start(self, start: int) -> int:
        return 0 if self.restart else min(start, self.n)

    def steps_per_epoch(self, accum: int) -> int:
        return steps_per_epoch(self.n, self.b, self.k, accum)

    def steps_left(self, start: int, accum: int) -> int:
        return steps_per_epoch(self.n - self._start(start), self.b, self.k, accum)

    def _to_device(self, inputs, target):
        move = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        return tree_map(move, inputs), move(target)

    def _items(self, fn, jobs: list) -> Iterator[dict]:
        if self.cfg.data.num_workers == 0:
            for job in jobs:
                yield fn(job)
        else:
            yield from data_loader(_Jobs(fn, jobs), self.cfg, self.rank, self.device)

    def _job(self, plan) -> dict:
        """Decode a job's samples (ranges of positions) and lay out its micro-batches."""
        ranges, micro, pieces_of = plan
        reader = self.split.source.reader
        before = reader.decoded_bytes
        pieces = [p for lo, hi in ranges for p in pieces_of(lo, hi)]
        arrays = self.split.arrays(pieces) if pieces else {}
        return {"arrays": {k: torch.from_numpy(v) for k, v in arrays.items()}, "micro": [(torch.from_numpy(i), n) for i, n in micro],
                "decoded": reader.decoded_bytes - before}

    def _micro_batches(self, order: EpochOrder, first: int) -> Iterator[tuple]:
        block0, round0 = divmod(first, order.sigma)
        blocks = list(range(block0, math.ceil(order.micro_steps / order.sigma)))
        items = self._items(_BlockJob(self, order, block0, round0), blocks)
        while (item := next(items, None)) is not None:
            self.decoded_bytes += int(item["decoded"])
            for idx, n in item["micro"]:
                yield (*self._to_device(*self.split.batch(item["arrays"], idx)), int(n))
            item = None  # a block's samples go before the next block is laid out: one block held, not two

    def epoch_steps(self, seed: int, epoch: int, start: int, accum: int, as_indices: bool = False) -> Iterator[Step]:
        start = self._start(start)
        self.restart = False
        if start % self.M and start < self.n:
            raise UserError(f"the resume point (sample {start} of the epoch) is not a whole number of global batches of {self.M}: the global batch changed")
        order = EpochOrder(self.split.samples, seed, epoch, self.M, self.window)
        first = start // self.M
        sizes = order.micro_sizes(first)
        batches = self._micro_batches(order, first)
        n_steps = math.ceil(len(sizes) / accum)
        for i in range(n_steps):
            part = sizes[i * accum : (i + 1) * accum]
            mine = sum(_share(s, self.rank, self.k) for s in part) if self.counted else 0
            end = min(self.n, (first + (i + 1) * accum) * self.M)
            yield Step(itertools.islice(batches, len(part)), len(part), sum(part), end, mine, i == n_steps - 1)
        for _ in batches:  # a DataLoader iterator must run to its end, or its workers keep the epoch open
            pass

    # ------------------------------------------------------------------ evaluation
    def eval_ids(self, local: torch.Tensor) -> torch.Tensor:
        """A sample's index in the split, from its index among this rank's evaluation samples."""
        return local + self.eval_first

    def eval_batches(self) -> Iterator[tuple]:
        limit = self.cfg.data.eval_max_samples
        n = min(self.n, limit) if limit else self.n
        lo, hi = n * self.rank // self.k, n * (self.rank + 1) // self.k
        self.eval_first = lo
        chunk = max(self.b, (auto_window(self.split.samples, self.split.source.maker.sample_bytes(), self.b, units=8) // self.b) * self.b)
        jobs = [(a, min(hi, a + chunk)) for a in range(lo, hi, chunk)]

        for item in self._items(_EvalJob(self), jobs):
            self.decoded_bytes += int(item["decoded"])
            for idx, _ in item["micro"]:
                yield self._to_device(*self.split.batch(item["arrays"], idx))

    def sample_batch(self, size: int = 4):
        m = min(size, self.n)
        arrays = self.split.arrays(self.split.canonical_positions(0, m))
        return self._to_device(*self.split.batch(arrays, torch.arange(m)))


def _share(samples: int, rank: int, k: int) -> int:
    """This rank's real samples in a micro-batch of `samples` (contiguous pieces, ranks differ by one at most)."""
    base, extra = divmod(samples, k)
    return base + (rank < extra)
