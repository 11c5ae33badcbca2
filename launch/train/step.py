"""One optimizer step: its micro-batches (DDP syncs only on the last), mixed precision, the loss
weighted by global element counts, clipping, the optimizer and LR-schedule step.

The weighting is what makes every launcher compute the same update. With static counts (see
launch.train.task) micro-batch j of rank r weighs its local mean by k * n_rj / N, N the global element
count of the optimizer step (known from the data order, no communication): full steps weigh
1/accum_steps, exactly a hand-written loop's update. With counted elements (ignored targets,
custom losses) each rank backpropagates its sum times k / N_nominal, and once the global count
is known (one tiny all-reduce) the gradients are multiplied by N_nominal / N.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from launch.errors import UserError
from launch.parallel import mesh
from launch.processes.dist import Runtime, all_reduce_sum
from launch.train.optim import autocast_context
from launch.train.task import Task


class TrainingModule(nn.Module):
    """What DDP and torch.compile wrap: the user's model plus its loss, so DDP sees the whole forward."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, inputs, target):
        return self.task.train_loss(self.model, inputs, target)


class LossTally:
    """The epoch's train-loss sum and element count. The step only appends detached losses (no
    tensor op, no sync); they are folded in at agreement points and epoch ends, the same steps in
    an uninterrupted and a resumed run, so the sum is reproducible bit for bit."""

    def __init__(self, device: torch.device, loss_sum: float = 0.0, count: float = 0.0):
        self.sum = torch.zeros((), dtype=torch.float64, device=device) + loss_sum
        self.count = count  # a host number with static counts, else a device tensor
        self.losses: list[torch.Tensor] = []
        self.counts: list = []
        self.static = True

    def add(self, loss: torch.Tensor, count, static: bool) -> None:
        self.losses.append(loss)
        self.counts.append(count)
        self.static = static

    def fold(self) -> None:
        if not self.losses:
            return
        losses = torch.stack(self.losses)
        if not self.static:  # sums and counted elements
            self.sum += losses.sum(dtype=torch.float64)
            self.count = self.count + sum(self.counts)
        elif min(self.counts) == max(self.counts):  # the usual case, in three tensor ops
            self.sum.add_(losses.sum(dtype=torch.float64), alpha=self.counts[0])
            self.count += sum(self.counts)
        else:  # an epoch's short last step: mean times count
            self.sum += (losses.double() * torch.tensor(self.counts, dtype=torch.float64).to(self.sum.device)).sum()
            self.count += sum(self.counts)
        self.losses.clear()
        self.counts.clear()

    def totals(self) -> torch.Tensor:
        """[sum, count] in float64 on the device (for an all-reduce)."""
        self.fold()
        return torch.stack([self.sum, torch.as_tensor(self.count, dtype=torch.float64).to(self.sum.device)])


class TrainStep:
    """Runs optimizer steps on `module` (the TrainingModule, maybe under DDP and torch.compile)."""

    wants_indices = False  # batches come selected (GraphedStep takes indices instead)

    def __init__(self, cfg, rt: Runtime, module: nn.Module, bare: nn.Module, task: Task, optimizer, scheduler, scaler, strategy):
        self.cfg, self.rt, self.module, self.task = cfg, rt, module, task
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.strategy = strategy  # launch.parallel: how gradients meet across ranks
        share = mesh.layout(cfg, rt.env)  # dist.tp: a tensor-parallel group computes one rank's loss together
        self.k = share.data_size  # the ranks whose gradients are averaged
        self.counted = not share.copy  # a TP peer's losses are its group's first rank's: tallied there
        self.params = [p for p in bare.parameters() if p.requires_grad]
        self.clip = cfg.train.grad_clip
        # A constant schedule without warmup has factor 1 forever: LambdaLR.step() would only cost time.
        self.step_lr = cfg.train.schedule != "constant" or cfg.train.warmup_steps > 0
        self.amp = contextlib.nullcontext() if cfg.train.precision == "fp32" else None
        self.nominal = self.k * cfg.data.batch_size * cfg.train.accum_steps * task.per_sample  # elements of a full step
        self.counted_weight = self.k / self.nominal  # counted elements: backprop sum x this, rescale once N is known
        self.last = (0.0, 1)
        self.eager_step = self  # GraphedStep has its eager TrainStep here too
        self.ema = None  # launch.train.ema.EMA, updated after each optimizer step (GraphedStep does it after a replay)

    def __call__(self, batches: Iterator, n_micro: int, global_samples: int, tally: LossTally, poison: bool = False) -> None:
        """One optimizer step over the next `n_micro` micro-batches, which hold `global_samples` samples on all ranks together."""
        static = self.task.static
        total = global_samples * self.task.per_sample  # global elements (static counts)
        counted = 0
        for i in range(n_micro):
            inputs, target, n = next(batches)
            last = i == n_micro - 1
            with self.strategy.micro_step(self.module, sync=last, real=n > 0):
                with self.amp or autocast_context(self.cfg, self.rt.device):
                    loss, count = self.module(inputs, target)
                if poison:
                    loss = loss * float("nan")
                if n == 0:  # a stand-in batch (see launch.data.order): it must add exactly nothing
                    loss, count = loss * 0.0, 0
                if static:
                    if n and count != n * self.task.per_sample:
                        raise UserError(f"targets must have the same shape for every sample: a batch of {n} holds {count} target elements, expected {n * self.task.per_sample}")
                    weight = self.k * count / total
                    scaled = loss if weight == 1.0 else loss * weight
                else:
                    scaled = loss * self.counted_weight
                    counted = counted + count
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            if self.counted:
                tally.add(loss.detach(), count, static)
        self.last = (loss.detach(), count)
        self._update(None if static else counted)

    def _update(self, counted) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        if counted is not None:  # the global element count is known only now
            self.rescale_to_global(counted)
        self.clip_gradients()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.step_lr:
            self.scheduler.step()

    def rescale_to_global(self, counted) -> None:
        """Counted elements: gradients of sum x counted_weight become gradients of sum / N, N the
        step's element count summed over ranks (one tiny all-reduce; no host sync)."""
        n = torch.as_tensor(counted if self.counted else 0, dtype=torch.float32, device=self.rt.device).clone()  # a TP peer's count is its group's
        all_reduce_sum(n, self.rt)
        # Sharded (DTensor) gradients are scaled through their local shards: the factor is one number.
        grads = [getattr(p.grad, "_local_tensor", p.grad) for p in self.params if p.grad is not None]
        torch._foreach_mul_(grads, self.nominal / n.clamp(min=1))

    def clip_gradients(self) -> None:
        if self.clip > 0:
            self.strategy.clip(self.params, self.clip)

    def last_loss(self) -> float:
        """The last micro-batch's mean loss (for log.every_steps records)."""
        loss, count = self.last
        return float(loss) if self.task.static else float(loss) / max(float(count), 1.0)
