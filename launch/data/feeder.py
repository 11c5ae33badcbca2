"""Feeds this rank's batches to the training device, in the order `launch.data.order` defines.

In-memory splits (tensors) are moved to the device once and each batch is one index-select
there; map-style datasets go through a DataLoader fed with the same index lists (persistent
workers, every sample seeded by (seed, epoch, index): launch.data.seeding). Streams
(IterableDatasets) have their own feeder, launch.data.stream; `make_feeder` picks one.

Training comes as `Step`s (launch.data.types): each optimizer step's micro-batches, its global
sample count and the epoch position after it. A micro-batch is (inputs, target, n): n is the number
of real samples, 0 for the zero-weight stand-in a rank runs when the epoch's last micro-step has no
sample left for it. The epoch order costs 4 bytes per sample (an int32 permutation); the
DataLoader's index lists are made batch by batch, not for the whole epoch.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from launch.data.loader import data_loader
from launch.data.order import epoch_permutation, global_samples, micro_steps, rank_eval_indices, rank_share, steps_per_epoch
from launch.data.seeding import EVAL_EPOCH, SeededDataset, keys
from launch.data.types import Split, Step, split_item, tree_map


class _BatchSampler:
    """A batch sampler whose batches are set per epoch (lazily), so persistent workers survive epochs."""

    def __init__(self):
        self.batches: Iterator[list] = iter(())
        self.count = 0

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return self.count


def make_feeder(split: Split, cfg, device: torch.device, rank: int, world_size: int, batch_size: int, counted: bool = True):
    """The feeder for this kind of split: tensors and map-style datasets here, streams in launch.data.stream;
    a dataset with its own order says so with `make_feeder` (the corpora of launch.data.corpus).
    `rank` of `world_size` is the data-parallel share; `counted` False on a rank fed a copy of another
    rank's share (a tensor-parallel peer, launch.parallel.mesh): its samples are counted there."""
    own = getattr(split.dataset, "make_feeder", None)
    if callable(own):
        feeder = own(cfg, device, rank, world_size, batch_size)
        feeder.counted = counted
        return feeder
    if split.stream:
        from launch.data.stream import StreamFeeder

        feeder = StreamFeeder(split, cfg, device, rank, world_size, batch_size)
    else:
        feeder = Feeder(split, cfg, device, rank, world_size, batch_size)
    feeder.counted = counted
    return feeder


class Feeder:
    """Yields this rank's batches on the training device."""

    counted = True  # False: a copy of another rank's share (make_feeder)

    def __init__(self, split: Split, cfg, device: torch.device, rank: int, world_size: int, batch_size: int):
        self.device, self.rank, self.world_size, self.batch_size = device, rank, world_size, batch_size
        self.n = len(split)
        self.loader = None
        self.where = f"data.name '{cfg.data.name}'"
        if split.dataset is None:
            # One copy to the device up front; each batch is then a single index-select there.
            self.x = tree_map(lambda t: t.to(device, non_blocking=True), split.x)
            self.y = split.y.to(device, non_blocking=True)
        else:
            self.sampler = _BatchSampler()
            # A dataset that draws no random numbers can say so (needs_sample_seeds = False) and skip the cost.
            seeded = cfg.data.seed_samples and getattr(split.dataset, "needs_sample_seeds", True)
            dataset = SeededDataset(split.dataset, cfg.train.seed) if seeded else _Plain(split.dataset)
            self.loader = data_loader(dataset, cfg, rank, device, self.sampler)

    @property
    def in_memory(self) -> bool:
        return self.loader is None

    def _to_device(self, batch):
        inputs, target = split_item(batch, self.where)
        move = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        return tree_map(move, inputs), move(target)

    def select(self, idx: torch.Tensor) -> tuple:
        """(inputs, target) of in-memory samples `idx` (a device tensor): one index-select per tensor."""
        return tree_map(lambda t: t.index_select(0, idx), self.x), self.y.index_select(0, idx)

    def _batches(self, parts: list[torch.Tensor], sizes: list[int], epoch: int, as_indices: bool = False) -> Iterator[tuple]:
        """Batches of the concatenated index `parts`, split into `sizes`."""
        if self.loader is None:
            indices = torch.cat(parts).to(self.device, dtype=torch.long, non_blocking=True)
            for chunk in indices.split(sizes):
                yield (chunk,) if as_indices else self.select(chunk)
        else:
            self.sampler.batches = self._index_lists(parts, sizes, epoch)
            self.sampler.count = len(sizes)
            for batch in self.loader:
                yield self._to_device(batch)

    @staticmethod
    def _index_lists(parts: list[torch.Tensor], sizes: list[int], epoch: int) -> Iterator[list]:
        """The DataLoader's keys, one batch at a time (whole-epoch lists cost ~76 bytes per sample)."""
        sizes = iter(sizes)
        for part in parts:
            at = 0
            while at < len(part):
                size = next(sizes)
                yield keys(epoch, part[at : at + size].tolist())
                at += size

    def train_epoch(self, seed: int, epoch: int, start: int = 0, as_indices: bool = False) -> Iterator[tuple]:
        """(inputs, target, n) for each of this rank's micro-steps from global position `start`
        ((indices, n) with as_indices, for in-memory data). Every rank yields the same number of micro-steps."""
        perm = epoch_permutation(self.n, seed, epoch)[min(start, self.n):]
        k, b = self.world_size, self.batch_size
        full = len(perm) // (k * b)  # micro-steps in which every rank gets b samples
        parts, real = [perm[: full * k * b][self.rank :: k]], [b] * full
        if micro_steps(len(perm), b, k) > full:
            tail = perm[full * k * b :]
            mine = tail[self.rank :: k]
            real.append(len(mine))
            # Nothing left for this rank in the last micro-step: stand in with the step's first
            # sample; the loop gives it weight 0, so it adds exactly nothing to the gradient.
            parts.append(mine if len(mine) else tail[:1])
        sizes = [max(n, 1) for n in real]
        for batch, n in zip(self._batches(parts, sizes, epoch, as_indices), real):
            yield (*batch, n)

    def steps_per_epoch(self, accum: int):
        return steps_per_epoch(self.n, self.batch_size, self.world_size, accum)

    def steps_left(self, start: int, accum: int) -> int:
        return steps_per_epoch(self.n - min(start, self.n), self.batch_size, self.world_size, accum)

    def epoch_steps(self, seed: int, epoch: int, start: int, accum: int, as_indices: bool = False) -> Iterator[Step]:
        """The epoch's optimizer steps from global position `start`."""
        start = min(start, self.n)
        remaining, k, b = self.n - start, self.world_size, self.batch_size
        n_micro = micro_steps(remaining, b, k)
        batches = iter(self.train_epoch(seed, epoch, start, as_indices))
        n_steps = math.ceil(n_micro / accum)
        for i in range(n_steps):
            first, last = i * accum, min((i + 1) * accum, n_micro)
            begin, end = first * k * b, min(remaining, last * k * b)
            mine = rank_share(end, self.rank, k) - rank_share(begin, self.rank, k) if self.counted else 0
            yield Step(batches, last - first, global_samples(remaining, first, last, b, k), start + end, mine, i == n_steps - 1)
        for _ in batches:  # a DataLoader iterator must run to its end, or its workers keep the epoch open
            pass

    def eval_batches(self) -> Iterator[tuple]:
        """(inputs, target) of this rank's share of the split, each sample on exactly one rank."""
        idx = rank_eval_indices(self.n, self.rank, self.world_size)
        return self._batches([idx], [len(c) for c in idx.split(self.batch_size)], EVAL_EPOCH)

    def sample_batch(self, size: int = 4):
        """The first `size` samples (for checking the model and loss against the data before training)."""
        m = min(size, self.n)
        return next(iter(self._batches([torch.arange(m)], [m], EVAL_EPOCH)))


class _Plain:
    """data.seed_samples=false: the dataset as it is, addressed by the same (epoch, index) keys."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        return self.dataset[key[1]]
