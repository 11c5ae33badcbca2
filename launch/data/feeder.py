"""Feeds this rank's batches to the training device, in the order `launch.data.order` defines.

In-memory splits (tensors) are moved to the device once and each batch is one index-select
there; other datasets go through a DataLoader fed with the same index lists (workers seeded
per rank, persistent across epochs). Training batches come as (inputs, target, n): n is the
number of real samples, 0 for the zero-weight stand-in a rank runs when the epoch's last
micro-step has no sample left for it.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader

from launch.data.order import epoch_permutation, micro_steps, rank_eval_indices
from launch.data.types import Split, split_item, tree_map


class _ListBatchSampler:
    """A batch sampler whose batches are set per epoch, so persistent workers survive epochs."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class Feeder:
    """Yields this rank's batches on the training device."""

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
            pin = cfg.data.pin_memory == "true" or (cfg.data.pin_memory == "auto" and device.type == "cuda")
            self.sampler = _ListBatchSampler()
            workers = cfg.data.num_workers
            self.loader = DataLoader(
                split.dataset,
                batch_sampler=self.sampler,
                num_workers=workers,
                pin_memory=pin,
                persistent_workers=workers > 0,
                prefetch_factor=2 if workers > 0 else None,
                generator=torch.Generator().manual_seed(cfg.train.seed * 1000 + rank),  # distinct worker seeds per rank
            )

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

    def _batches(self, indices: torch.Tensor, sizes: list[int], as_indices: bool = False) -> Iterator[tuple]:
        """Batches of `indices` split into `sizes` (one copy of the indices to the device)."""
        if self.loader is None:
            for chunk in indices.to(self.device, non_blocking=True).split(sizes):
                yield (chunk,) if as_indices else self.select(chunk)
        else:
            self.sampler.batches = [c.tolist() for c in indices.split(sizes)]
            for batch in self.loader:
                yield self._to_device(batch)

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
        for batch, n in zip(self._batches(torch.cat(parts), sizes, as_indices), real):
            yield (*batch, n)

    def eval_batches(self) -> Iterator[tuple]:
        """(inputs, target) of this rank's share of the split, each sample on exactly one rank."""
        idx = rank_eval_indices(self.n, self.rank, self.world_size)
        return self._batches(idx, [len(c) for c in idx.split(self.batch_size)])

    def sample_batch(self, size: int = 2):
        """The first `size` samples (for checking the model and loss against the data before training)."""
        return next(iter(self._batches(torch.arange(min(size, self.n)), [min(size, self.n)])))
