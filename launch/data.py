"""Datasets and the order in which every rank sees them.

Two rules make DDP results provable:
- Training order follows torch's DistributedSampler exactly in every launcher (world
  size 1 included): the epoch permutation is `randperm(n)` seeded with seed + epoch, padded
  to a multiple of the world size by repeating its head, and rank r takes every
  world_size-th index starting at r. Step i of a run with k ranks at batch b therefore
  consumes global positions [i*k*b, (i+1)*k*b) of the permutation, the same samples as
  step i of one process at batch k*b. A resume skips a count of samples, so it can
  continue mid-epoch, even at another world size.
- Evaluation is exact: rank r evaluates samples r, r+k, r+2k, ... with no padding, so each
  sample is counted once; the loop all-reduces sums and counts and divides once.

In-memory datasets (tensors) are moved to the training device once and batched by one
index-select per batch; other datasets go through a DataLoader fed with the same indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from launch.errors import UserError
from launch.model import import_object


@dataclass
class Split:
    """One split: either in-memory tensors (x, y) or a map-style Dataset yielding (x, y)."""

    x: Optional[torch.Tensor] = None
    y: Optional[torch.Tensor] = None
    dataset: Optional[Dataset] = None

    def __len__(self) -> int:
        return len(self.y) if self.dataset is None else len(self.dataset)


@dataclass
class DataBundle:
    train: Split
    eval: Split
    in_features: int
    num_classes: int
    state: dict = field(default_factory=dict)
    """Plain-typed data state saved with checkpoints (class names, standardisation statistics...)."""


# --------------------------------------------------------------------------- built-in datasets


def toy() -> DataBundle:
    """The seeds' toy problem: 5 training and 2 test points in 2-D, two classes (x0 + x1 > 1)."""
    x_train = torch.tensor([[0.0, 0.0], [0.2, 0.9], [1.0, 1.0], [0.9, 0.4], [0.1, 0.3]])
    y_train = torch.tensor([0, 1, 1, 1, 0])
    x_test = torch.tensor([[0.8, 0.9], [0.2, 0.1]])
    y_test = torch.tensor([1, 0])
    return DataBundle(Split(x_train, y_train), Split(x_test, y_test), 2, 2)


def synthetic(d) -> DataBundle:
    """The seeds' benchmark data: standard-normal features; labels from a fixed random teacher
    MLP (learnable) or uniformly random (as in the seeds' speed benchmark). Identical on every rank."""
    g = torch.Generator().manual_seed(d.seed)
    n = d.n_train + d.n_eval
    x = torch.randn(n, d.features, generator=g)
    if d.learnable:
        w1 = torch.randn(d.features, 64, generator=g) / math.sqrt(d.features)
        w2 = torch.randn(64, d.classes, generator=g) / 8.0
        y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    else:
        y = torch.randint(0, d.classes, (n,), generator=g)
    return DataBundle(Split(x[: d.n_train], y[: d.n_train]), Split(x[d.n_train :], y[d.n_train :]), d.features, d.classes)


def from_import_path(cfg) -> DataBundle:
    cls = import_object(cfg.data.name, "data.name")
    try:
        train, ev = cls(split="train", **cfg.data.kwargs), cls(split="eval", **cfg.data.kwargs)
    except TypeError as e:
        raise UserError(f"data.name '{cfg.data.name}': cannot build it with split=... and data.kwargs ({e})") from None
    if len(train) == 0:
        raise UserError(f"data.name '{cfg.data.name}': the training split is empty")
    x0, _ = train[0]
    in_features = int(getattr(train, "in_features", torch.as_tensor(x0).numel()))
    num_classes = getattr(train, "num_classes", None) or cfg.model.out_features
    if num_classes is None:
        raise UserError(f"data.name '{cfg.data.name}': give the dataset a num_classes attribute or set model.out_features")
    return DataBundle(Split(dataset=train), Split(dataset=ev), in_features, int(num_classes))


def build(cfg) -> DataBundle:
    name = cfg.data.name
    if name == "toy":
        return toy()
    if name == "synthetic":
        return synthetic(cfg.data)
    if name in ("csv", "npz"):
        from launch import tabular  # file datasets live in their own modules, imported when used

        return tabular.build_csv(cfg) if name == "csv" else tabular.build_npz(cfg)
    if name == "mnist":
        from launch import mnist

        return mnist.build(cfg)
    if ":" in name:
        return from_import_path(cfg)
    raise UserError(f"data.name={name}: this dataset is not available in this build")


# --------------------------------------------------------------------------- ordering


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """DistributedSampler's permutation: a pure function of (seed, epoch)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g)


def padded_order(n: int, seed: int, epoch: int, world_size: int) -> torch.Tensor:
    """The permutation padded by repeating its head to a multiple of world_size (DistributedSampler, drop_last=False)."""
    perm = epoch_permutation(n, seed, epoch)
    total = math.ceil(n / world_size) * world_size
    if total > n:
        pad = total - n
        perm = torch.cat([perm, perm.repeat(math.ceil(pad / n))[:pad]])
    return perm


def resume_offset(samples_consumed: int, world_size: int) -> int:
    """Where to restart inside an epoch: the consumed count, rounded down to a multiple of world_size.
    Exact when the world size did not change (the count is then already a multiple); after a
    change at most world_size-1 samples are seen twice."""
    return samples_consumed - samples_consumed % world_size


def rank_train_indices(n: int, seed: int, epoch: int, rank: int, world_size: int, start: int = 0) -> torch.Tensor:
    """This rank's indices for the rest of an epoch, from global position `start`."""
    order = padded_order(n, seed, epoch, world_size)[start:]
    return order[rank::world_size]


def rank_eval_indices(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Samples r, r+k, ...: each evaluation sample on exactly one rank, no padding."""
    return torch.arange(rank, n, world_size)


def steps_per_epoch(n: int, batch_size: int, world_size: int, accum_steps: int) -> int:
    per_rank = math.ceil(n / world_size)
    return math.ceil(math.ceil(per_rank / batch_size) / accum_steps)


class _ListBatchSampler:
    """A batch sampler whose batches are set per epoch, so persistent workers survive epochs."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class Feeder:
    """Yields this rank's (x, y) batches on the training device."""

    def __init__(self, split: Split, cfg, device: torch.device, rank: int, world_size: int, batch_size: int):
        self.split, self.device, self.rank, self.world_size, self.batch_size = split, device, rank, world_size, batch_size
        self.n = len(split)
        self.loader = None
        if split.dataset is None:
            # One copy to the device up front; each batch is then a single index-select there.
            self.x = split.x.to(device, non_blocking=True)
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

    def _iterate(self, indices: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.loader is None:
            idx = indices.to(self.device, non_blocking=True)
            for chunk in idx.split(self.batch_size):
                yield self.x.index_select(0, chunk), self.y.index_select(0, chunk)
        else:
            self.sampler.batches = [c.tolist() for c in indices.split(self.batch_size)]
            for x, y in self.loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_epoch(self, seed: int, epoch: int, start: int = 0):
        return self._iterate(rank_train_indices(self.n, seed, epoch, self.rank, self.world_size, start))

    def eval_batches(self):
        return self._iterate(rank_eval_indices(self.n, self.rank, self.world_size))
