"""Evaluation rows from every rank onto rank 0, each sample once and in sample order; values back.

Rank r evaluates samples r, r+k, r+2k, ... with no padding (launch.data.order), so the ranks hold
different numbers of rows (and a sequence sample has as many rows as it has counted tokens). torch's
gather needs equal sizes: the row counts are all-gathered first, every rank pads to the largest,
rank 0 trims each part to its count. Nothing is duplicated, unlike a DistributedSampler's padding
that gather_for_metrics must cut off again. Each row carries its global sample index, and a stable
sort by it restores the order of one process (a sample's rows keep theirs).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _wire(rt) -> torch.device:
    """Where the collectives run: the device under NCCL, host memory under gloo (gloo's gather takes CPU tensors)."""
    return rt.device if rt.backend == "nccl" else torch.device("cpu")


def _spread(rt) -> bool:
    return rt.env.distributed and rt.env.world_size > 1


def gather_rows(tensors: list[torch.Tensor], ids: torch.Tensor, rt) -> Optional[list[torch.Tensor]]:
    """Rank 0: each of `tensors` (rows along dim 0, one global sample index per row in `ids`) from
    all ranks, concatenated in sample order. Other ranks: None. A collective: every rank calls it."""
    if not _spread(rt):
        order = torch.sort(ids, stable=True).indices.to(tensors[0].device) if ids.numel() else ids
        return [t[order] for t in tensors]
    wire, k, main = _wire(rt), rt.env.world_size, rt.env.is_main
    count = torch.tensor([ids.shape[0]], dtype=torch.long, device=wire)
    counts = [torch.zeros_like(count) for _ in range(k)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    most = max(counts)
    whole = []
    for t in (ids, *tensors):
        dtype = t.dtype
        t = t.to(wire, torch.uint8 if dtype == torch.bool else dtype)  # not every backend gathers bool
        padded = torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in range(k)] if main else None
        dist.gather(padded, parts, dst=0)
        if main:
            whole.append(torch.cat([p[:c] for p, c in zip(parts, counts)]).to(dtype))
    if not main:
        return None
    order = torch.sort(whole[0], stable=True).indices
    return [w[order] for w in whole[1:]]


def share(values: list[float], ok: bool, rt) -> tuple[list[float], bool]:
    """Rank 0's values (and whether it computed them) on every rank: one broadcast."""
    if not _spread(rt) or not values:
        return values, ok
    t = torch.tensor([float(ok), *values], dtype=torch.float64, device=_wire(rt))
    dist.broadcast(t, src=0)
    got = t.tolist()
    return got[1:], bool(got[0])
