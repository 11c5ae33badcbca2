"""Exact distributed evaluation: each sample on one rank, float64 sums and counts all-reduced, divided once;
metrics that need every prediction gathered onto rank 0 in sample order (launch.observe.metrics, launch.observe.gather)."""

from __future__ import annotations

import torch
from torch import nn

from launch.data.feeder import Feeder
from launch.processes.dist import Runtime, all_reduce_sum
from launch.train.optim import autocast_context
from launch.train.task import Task


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, feeder: Feeder, rt: Runtime, cfg, lockstep: bool = False) -> dict:
    """{'eval_loss', then 'eval_<metric>' for each of train.metrics that applies (launch.observe.metrics;
    by default 'eval_accuracy' for classification losses, per element: per token for sequences,
    ignored targets left out), 'eval_samples'}. `model` must be the bare module (no DDP forward, so
    no hidden collectives). With `lockstep` (a sharded model: every forward gathers parameters from
    all ranks) the ranks agree before each batch whether anyone has one left, and a rank that has run
    out runs a stand-in batch whose sums and predictions it drops."""
    was_training = model.training
    model.eval()
    metrics = task.metrics
    if not metrics.fitted:  # a caller that skipped the start-up check (launch predict): check on one batch
        task.check(model, *feeder.sample_batch())
    tally = metrics.tally(feeder.rank, feeder.world_size)  # the data-parallel share (launch.parallel.mesh)
    tally.place = getattr(feeder, "eval_ids", None)  # a feeder that deals other than r, r+k, ... says where its samples sit
    counted = feeder.counted  # False on a tensor-parallel peer: its group's first rank counts the share
    # loss sum, elements, samples, then the metrics' sums: one all-reduce for all of them
    totals = torch.zeros(3 + tally.width, dtype=torch.float64, device=rt.device)
    seen, wants_view = 0, bool(metrics.active)
    for inputs, target, real in _batches(feeder, rt, lockstep):
        with autocast_context(cfg, rt.device):
            sums, view = task.eval_sums(model, inputs, target, wants_view)
        if real and counted:
            totals[:2] += sums
            totals[2] += target.shape[0]
            if view is not None:
                extra = tally.add(view, seen)
                if extra is not None:
                    totals[3:] += extra
            seen += target.shape[0]
    all_reduce_sum(totals, rt)
    model.train(was_training)
    loss_sum, count, samples = totals[:3].tolist()
    out = {"eval_loss": loss_sum / count if count else float("nan")}
    out.update(tally.values(totals[3:] if tally.width else None, rt))
    out["eval_samples"] = int(samples)
    return out


def _batches(feeder: Feeder, rt: Runtime, lockstep: bool):
    """(inputs, target, real) for this rank's evaluation batches; with lockstep, as many on every rank."""
    stand_in = None
    batches = iter(feeder.eval_batches())
    while True:
        batch = next(batches, None)
        if lockstep:
            left = all_reduce_sum(torch.tensor([float(batch is not None)], device=rt.device), rt)
            if left.item() == 0:
                return
            if batch is None:
                yield (*(stand_in or feeder.sample_batch(1)), False)
                continue
        elif batch is None:
            return
        stand_in = stand_in or batch
        yield (*batch, True)
