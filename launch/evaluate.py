"""Exact distributed evaluation: each sample on one rank, float64 sums and counts all-reduced, divided once."""

from __future__ import annotations

import torch
from torch import nn

from launch.data.feeder import Feeder
from launch.dist import Runtime, all_reduce_sum
from launch.optim import autocast_context
from launch.task import Task


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, feeder: Feeder, rt: Runtime, cfg, lockstep: bool = False) -> dict:
    """{'eval_loss', 'eval_samples'} and, for classification losses, 'eval_accuracy' (per element:
    per token for sequences, ignored targets left out). `model` must be the bare module (no DDP
    forward, so no hidden collectives). With `lockstep` (a sharded model: every forward gathers
    parameters from all ranks) the ranks agree before each batch whether anyone has one left, and a
    rank that has run out runs a stand-in batch whose sums it drops."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss sum, elements, correct, samples
    for inputs, target, real in _batches(feeder, rt, lockstep):
        with autocast_context(cfg, rt.device):
            sums = task.eval_sums(model, inputs, target)
        if real:
            totals[:3] += sums
            totals[3] += target.shape[0]
    all_reduce_sum(totals, rt)
    model.train(was_training)
    loss_sum, count, correct, samples = totals.tolist()
    out = {"eval_loss": loss_sum / count if count else float("nan")}
    if task.classification:
        out["eval_accuracy"] = correct / count if count else float("nan")
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
