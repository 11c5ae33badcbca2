"""Losses a model computes itself, and the check that a sum is a sum.

Two contracts (launch.task):
- `loss(self, batch) -> (loss_sum, count)`: a method of the model;
- `model.loss_arg=NAME`: the model's forward takes the target as keyword NAME and returns its loss as
  `.loss`, `["loss"]` or the scalar tensor in a returned tuple (Hugging Face: `labels`, a mean over
  the targets shifted by one inside the model; nanoGPT: `targets`, a mean over the targets).
  `model.loss_reduction` says which mean (or a sum); the launcher turns it into (sum, count) with
  the count of targets other than train.ignore_index, so DDP and accumulation weigh tokens exactly.

A mean where a sum is expected trains at the wrong scale and makes the logged loss depend on the
evaluation batch size, silently. So before training, on the first batch: the sum over the batch
must equal the sums over its two halves, and the count their counts. A mean fails that (unless the
halves' losses happen to be equal), and the line says which declaration would fit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from launch.data.types import tree_map
from launch.errors import UserError
from launch.user_code import call

REDUCTIONS = ("mean", "mean_shifted", "sum")


def halves(inputs, target):
    """The batch's two halves (split on the first axis of every tensor)."""
    h = target.shape[0] // 2
    first = tree_map(lambda t: t[:h], inputs), target[:h]
    second = tree_map(lambda t: t[h:], inputs), target[h:]
    return first, second


def adds_up(whole: float, parts: list[float]) -> bool:
    scale = abs(whole) + sum(abs(p) for p in parts) + 1e-6
    return abs(whole - sum(parts)) <= 1e-3 * scale


def check_method_sums(model, inputs, target, debug: bool) -> None:
    """model.loss(batch) must return (sum, count), additive over a split of the batch."""
    out = call("model.loss(batch)", model.loss, (inputs, target), debug=debug)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise UserError(f"model.loss(batch) must return (loss_sum, count), got {type(out).__name__}")
    if target.shape[0] < 2:
        return
    a, b = (call("model.loss(batch)", model.loss, half, debug=debug) for half in halves(inputs, target))
    whole, parts = float(out[0]), [float(a[0]), float(b[0])]
    if not adds_up(whole, parts) or float(out[1]) != float(a[1]) + float(b[1]):
        raise UserError(
            f"model.loss(batch) must return (sum over the batch, element count): on the first batch of {target.shape[0]} it gave "
            f"{whole:.6g} (count {float(out[1]):g}), but {parts[0]:.6g} + {parts[1]:.6g} (counts {float(a[1]):g} + {float(b[1]):g}) for its halves; "
            "a mean? return (mean * count, count), or for a model that computes a mean in its forward set model.loss_arg and model.loss_reduction"
        )


def loss_of(out):
    """The loss a model returned: .loss, ['loss'], or the one scalar tensor of a tuple (nanoGPT's (logits, loss))."""
    if isinstance(out, Mapping) and isinstance(out.get("loss"), torch.Tensor):
        return out["loss"]
    if isinstance(out, torch.Tensor) and out.dim() == 0:
        return out
    if isinstance(out, (tuple, list)):
        scalars = [t for t in out if isinstance(t, torch.Tensor) and t.dim() == 0]
        if len(scalars) == 1:
            return scalars[0]
    return None


class OwnLoss:
    """model.loss_arg: the loss the model's forward computes, as (sum, count)."""

    def __init__(self, cfg):
        self.arg, self.reduction, self.ignore = cfg.model.loss_arg, cfg.model.loss_reduction, cfg.train.ignore_index

    def call(self, model, inputs, target):
        kw = {self.arg: target}
        if isinstance(inputs, dict):
            return model(**inputs, **kw)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs, **kw)
        return model(inputs, **kw)

    def count(self, target: torch.Tensor, reduction: str):
        counted = target[..., 1:] if reduction == "mean_shifted" else target
        return (counted != self.ignore).sum()

    def sum_and_count(self, model, inputs, target, reduction: str = ""):
        reduction = reduction or self.reduction
        loss = loss_of(self.call(model, inputs, target)).float()
        n = self.count(target, reduction)
        return (loss if reduction == "sum" else loss * n), n

    def check(self, model, inputs, target, debug: bool) -> str:
        """Before training: the model takes the target and returns a loss whose declared reduction adds up."""
        where = f"model.loss_arg={self.arg}"
        out = call(f"the model's forward with {self.arg}=target", self.call, model, inputs, target, debug=debug)
        loss = loss_of(out)
        if loss is None:
            kind = f"a {type(out).__name__}" + (f" with keys {', '.join(map(str, out))}" if isinstance(out, Mapping) else "")
            raise UserError(f"{where}: the model returned {kind}, no loss in it (expected .loss, ['loss'] or one scalar tensor in a tuple)")
        if target.shape[0] >= 2:
            fits = [r for r in REDUCTIONS if self._adds_up(model, inputs, target, r)]
            if self.reduction not in fits:
                hint = f"set model.loss_reduction={fits[0]}" if fits else "the loss is neither a sum nor a mean over the counted targets; return a sum, or use a loss(self, batch) method"
                raise UserError(
                    f"{where}, model.loss_reduction={self.reduction}: on the first batch the loss does not add up over the batch's two halves "
                    f"as a {self.reduction} would (targets equal to train.ignore_index={self.ignore} are not counted); {hint}"
                )
        what = {"mean": "a mean over the targets", "mean_shifted": "a mean over the targets shifted by one", "sum": "a sum"}[self.reduction]
        return f"loss: the model's own ({where}, {what}, weighted by its count of targets)"

    def _adds_up(self, model, inputs, target, reduction: str) -> bool:
        whole = self.sum_and_count(model, inputs, target, reduction)
        parts = [self.sum_and_count(model, *half, reduction) for half in halves(inputs, target)]
        if float(whole[1]) == 0:
            return False
        return adds_up(float(whole[0]), [float(p[0]) for p in parts])
