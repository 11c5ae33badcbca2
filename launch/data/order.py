"""The order in which every rank sees the data: exact for every dataset size.

Training: the epoch permutation is `randperm(n)` seeded with seed + epoch (DistributedSampler's
shuffle). From global position `start` (a resume point), rank r takes every world_size-th
position starting at r, with NO padding, so each sample is seen exactly once per epoch on the
union of ranks. With per-process batch b and k ranks, micro-step j covers global positions
[j*k*b, (j+1)*k*b): the same samples as step j of one process at batch k*b. Only the epoch's
last micro-step can be short; its samples are dealt round-robin, so ranks differ by at most one
sample and a rank may get none (the step then runs a zero-weight stand-in batch, so every rank
calls the same collectives). The loss of each step is weighted by global sample counts, so the
update equals one process's update on the same global batch.

Evaluation: rank r evaluates samples r, r+k, r+2k, ...: each sample once, no padding.
"""

from __future__ import annotations

import math

import torch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """DistributedSampler's permutation: a pure function of (seed, epoch). As int32 below 2**31
    samples: the same permutation as torch's int64 one (same algorithm), at half the memory."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g, dtype=torch.int32 if n < 2**31 else torch.int64)


def rank_train_indices(n: int, seed: int, epoch: int, rank: int, world_size: int, start: int = 0) -> torch.Tensor:
    """This rank's indices for the rest of an epoch, from global position `start`."""
    return epoch_permutation(n, seed, epoch)[min(start, n):][rank::world_size]


def rank_eval_indices(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Samples r, r+k, ...: each evaluation sample on exactly one rank, no padding."""
    return torch.arange(rank, n, world_size)


def micro_steps(remaining: int, batch_size: int, world_size: int) -> int:
    """Micro-steps (forward/backward passes) every rank makes for `remaining` samples."""
    return math.ceil(remaining / (batch_size * world_size))


def steps_per_epoch(n: int, batch_size: int, world_size: int, accum_steps: int) -> int:
    """Optimizer steps for `n` samples: the same on every rank."""
    return math.ceil(micro_steps(n, batch_size, world_size) / accum_steps)


def global_samples(remaining: int, first_micro: int, last_micro: int, batch_size: int, world_size: int) -> int:
    """Samples that all ranks together see in micro-steps [first_micro, last_micro)."""
    per = batch_size * world_size
    return max(0, min(remaining, last_micro * per) - first_micro * per)


def rank_share(remaining: int, rank: int, world_size: int) -> int:
    """Real samples rank `rank` sees of `remaining` (ranks differ by at most one)."""
    return len(range(rank, remaining, world_size))
