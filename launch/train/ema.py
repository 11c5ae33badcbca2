"""train.ema_decay: an exponential moving average of the parameters, evaluated and saved beside them.

After every optimizer step each rank moves its shadow copy of the parameters toward them,
    ema = decay * ema + (1 - decay) * params
(torch.optim.swa_utils.get_ema_multi_avg_fn does the update, as foreach lerps). Buffers (BatchNorm
statistics) are not averaged: the EMA model uses the model's current ones, copied. With
train.ema_warmup_steps=W the decay ramps up linearly over the first W steps (decay x step / W), so an
early EMA is not dominated by the random initial weights.

The shadows live where the parameters live: whole under DDP (identical on every rank, since the
parameters are), and as the local shards under FSDP (AveragedModel's deep copy of the module would not
do for a sharded model). They are part of every checkpoint (a resume is bitwise), each epoch is also
evaluated with them (eval_loss_ema, eval_accuracy_ema, ...), and the run ends with model_ema.pt, a plain
state dict like model.pt (`launch predict RUN/model_ema.pt --eval` reproduces eval_loss_ema).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    return getattr(t, "_local_tensor", t)  # a DTensor's shard on this rank (FSDP), else the tensor


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 0):
        self.decay, self.warmup = decay, warmup_steps
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for _, p in self.named]
        self.updates = 0

    def decay_now(self) -> float:
        if self.warmup and self.updates < self.warmup:
            return self.decay * self.updates / self.warmup
        return self.decay

    @torch.no_grad()
    def update(self) -> None:
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        self.updates += 1
        get_ema_multi_avg_fn(self.decay_now())([_local(s) for s in self.shadow], [_local(p.detach()) for _, p in self.named], None)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """The model holds the averaged parameters inside the block, its own again after it."""
        saved = [_local(p).clone() for _, p in self.named]
        for (_, p), s in zip(self.named, self.shadow):
            _local(p).copy_(_local(s))
        try:
            yield
        finally:
            for (_, p), s in zip(self.named, saved):
                _local(p).copy_(s)

    def state(self) -> dict:
        """{parameter name: shadow} (DTensor shards under FSDP) for a checkpoint."""
        return {n: s for (n, _), s in zip(self.named, self.shadow)}

    @torch.no_grad()
    def load(self, state: dict, updates: int) -> None:
        for (n, _), s in zip(self.named, self.shadow):
            _local(s).copy_(_local(state[n]))
        self.updates = updates
