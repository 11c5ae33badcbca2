"""A LightningModule trains through its own `training_step`, under this launcher's exactness rules.

Lightning's contract is `training_step(batch, batch_idx) -> loss` (or a mapping with "loss"), the
loss a mean over the batch. The launcher's is a (sum, count) pair it weights by global counts
(launch.train.task), so the step's mean becomes (mean x samples, samples). That is exact for k ranks
against one process when the mean is over the batch's samples, which the first batch checks like
every loss(batch) method (the whole batch's sum must equal its halves' sums: launch.train.losses).
A token mean over sequences of varying length is not a sample mean and is refused in that line.

What is not used, said once at start-up: `configure_optimizers` (train.optimizer and train.lr train
the model, so that a checkpoint can resume them), `self.log` / `self.log_dict` (dropped: without a
Trainer Lightning would warn on every call; the launcher logs the loss and train.metrics) and the
Trainer's hooks (`validation_step`, `on_train_epoch_end`, ...): evaluation is the same training_step
in eval mode without gradients, summed exactly over the evaluation split. `batch_idx` counts the
calls in this process (Lightning's counts batches in the epoch).

Lightning is never imported: a model is a LightningModule when one of its classes is Lightning's.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

# where LightningModule lives in `lightning` and in the older `pytorch_lightning` package
_HOMES = ("lightning.pytorch.core.module", "pytorch_lightning.core.module", "pytorch_lightning.core.lightning")


def lightning_base(model: nn.Module) -> Optional[type]:
    """Lightning's LightningModule class if `model` is one, else None."""
    for cls in type(model).__mro__:
        if cls.__name__ == "LightningModule" and cls.__module__ in _HOMES:
            return cls
    return None


def _dropped(*args, **kwargs) -> None:
    return None


def _batch_size(batch) -> int:
    target = batch[1]
    return target.shape[0] if isinstance(target, torch.Tensor) else len(target)


def step_loss(model: nn.Module) -> Optional[Callable]:
    """`loss(model, batch) -> (sum, count)` from the model's training_step; None if the model is no
    LightningModule or keeps Lightning's own (empty) training_step."""
    base = lightning_base(model)
    if base is None or type(model).training_step is base.training_step:
        return None
    model.log = model.log_dict = _dropped  # on the instance: the class stays as the user wrote it
    calls = [0]

    def loss(m: nn.Module, batch):
        out = m.training_step(batch, calls[0])
        calls[0] += 1
        value = out.get("loss") if isinstance(out, dict) else out
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            from launch.errors import UserError

            raise UserError(f"{type(m).__name__}.training_step must return a scalar loss tensor or a mapping with 'loss', got {type(out).__name__}")
        n = _batch_size(batch)
        return value.float() * n, n

    loss.label, loss.mean = f"{type(model).__name__}.training_step", True  # a mean, scaled by the samples
    return loss


def note(model: nn.Module, cfg, trained_by: str = "") -> str:
    """What of a LightningModule is used and what is not, in one line (empty for other models).
    `trained_by`: what its loss is when not its training_step (e.g. 'model.loss_arg=labels'); empty: the step."""
    if lightning_base(model) is None:
        return ""
    name = type(model).__name__
    if trained_by:
        return f"note: {name} is a LightningModule trained through {trained_by}: training_step, configure_optimizers and self.log are not used"
    return (
        f"loss: {name}.training_step (a LightningModule; its loss is taken as a mean over the batch's samples, checked on the first batch); "
        f"not used: configure_optimizers (train.optimizer={cfg.train.optimizer}, train.lr={cfg.train.lr} train it), self.log, "
        "validation_step and the Trainer's hooks (evaluation runs training_step without gradients)"
    )
