"""Losses a model computes itself, and the check that a sum is a sum.

Two contracts (launch.train.task):
- `loss(self, batch) -> (loss_sum, count)`: a method of the model;
- `model.loss_arg=NAME`: the model's forward takes the target as keyword NAME and returns its loss as
  `.loss`, `["loss"]` or the scalar tensor in a returned tuple (Hugging Face: `labels`, a mean over
  the targets shifted by one inside the model; nanoGPT: `targets`, a mean over the targets).
  `model.loss_reduction` says which mean (or a sum); the launcher turns it into (sum, count) with
  the count of targets other than train.ignore_index, so DDP and accumulation weigh tokens exactly.

A mean where a sum is expected trains at the wrong scale and makes the logged loss depend on the
evaluation batch size, silently. So before training, on the first batch: the sum over the batch
must equal the sums over its samples one by one, and the count their counts. A mean fails that (unless the
samples' losses happen to be equal), and the line says which declaration would fit.
"""

from __future__ import annotations

import inspect

from collections.abc import Mapping

import torch

from launch.data.types import tree_map
from launch.errors import UserError
from launch.user_code import call

REDUCTIONS = ("mean", "mean_shifted", "sum")


def parts(inputs, target) -> list[tuple]:
    """The batch split into single samples (split on the first axis of every tensor): the strictest
    test of additivity, since samples differ most in their counts."""
    return [(tree_map(lambda t: t[i : i + 1], inputs), target[i : i + 1]) for i in range(target.shape[0])]


def adds_up(whole: float, pieces: list[float]) -> bool:
    scale = abs(whole) + sum(abs(p) for p in pieces) + 1e-6
    return abs(whole - sum(pieces)) <= 1e-4 * scale


def own_method(model):
    """`loss(model, batch) -> (sum, count)` calling the model's loss(batch) method; None when its class
    defines none (an attribute `loss` that is a module, e.g. nn.CrossEntropyLoss(), is not one)."""
    if not inspect.isfunction(getattr(type(model), "loss", None)):
        return None

    def loss(m, batch):
        return m.loss(batch)

    loss.label, loss.mean = "model.loss(batch)", False
    return loss


def check_method_sums(method, model, inputs, target, debug: bool) -> None:
    """The model's own loss (`method(model, batch)`: a loss(batch) method, a LightningModule's
    training_step) must return (sum, count), additive over a split of the batch."""
    what = method.label
    out = call(what, method, model, (inputs, target), debug=debug)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise UserError(f"{what} must return (loss_sum, count), got {type(out).__name__}")
    if target.shape[0] < 2:
        return
    each = [call(what, method, model, p, debug=debug) for p in parts(inputs, target)]
    whole, pieces = float(out[0]), [float(e[0]) for e in each]
    if not adds_up(whole, pieces) or float(out[1]) != sum(float(e[1]) for e in each):
        if method.mean:  # a training_step's mean, scaled by the batch's samples
            raise UserError(
                f"{what} must return the mean of its batch's per-sample losses (the launcher weights it by samples across ranks): on the first batch of "
                f"{target.shape[0]} its mean x samples gave {whole:.6g}, its samples one by one {sum(pieces):.6g} (a token mean over sequences of "
                "varying length?); give the model a loss(batch) method returning (sum, count), or set model.loss_arg"
            )
        raise UserError(
            f"model.loss(batch) must return (sum over the batch, element count): on the first batch of {target.shape[0]} it gave "
            f"{whole:.6g} (count {float(out[1]):g}), but its samples one by one add up to {sum(pieces):.6g}; "
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
                    f"{where}, model.loss_reduction={self.reduction}: on the first batch the loss does not add up over the batch's samples "
                    f"as a {self.reduction} would (targets equal to train.ignore_index={self.ignore} are not counted); {hint}"
                )
        self._check_shift(out, loss, inputs, target)
        what = {"mean": "a mean over the targets", "mean_shifted": "a mean over the targets shifted by one", "sum": "a sum"}[self.reduction]
        return f"loss: the model's own ({where}, {what}, weighted by its count of targets)"

    def _check_shift(self, out, loss, inputs, target) -> None:
        """Targets that are already the inputs shifted by one, given to a model that shifts its labels
        again (Hugging Face's causal LMs), would train it to predict two tokens ahead, silently."""
        logits = out.get("logits") if isinstance(out, Mapping) else (out[0] if isinstance(out, (tuple, list)) and out else None)
        if not (isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[:2] == target.shape and not target.is_floating_point()):
            return
        if not (model_shifts(logits, target, loss, self.ignore) and shifted_by(inputs, target, self.ignore, 1)):
            return
        raise UserError(
            f"model.loss_arg={self.arg}: the targets are already the inputs shifted by one (target[t] = input[t + 1]) and the model "
            "shifts its labels again (its loss is logits[:, :-1] against labels[:, 1:]): it would learn to predict two tokens ahead. "
            "Give it unshifted labels (Hugging Face's convention), or drop model.loss_arg so that train.loss=cross_entropy reads its logits"
        )

    def _adds_up(self, model, inputs, target, reduction: str) -> bool:
        whole = self.sum_and_count(model, inputs, target, reduction)
        pieces = [self.sum_and_count(model, *p, reduction) for p in parts(inputs, target)]
        if float(whole[1]) == 0:
            return False
        return adds_up(float(whole[0]), [float(p[0]) for p in pieces if float(p[1]) > 0])


def _mean_ce(logits: torch.Tensor, target: torch.Tensor, ignore: int) -> float:
    import torch.nn.functional as F

    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=ignore))


def model_shifts(logits: torch.Tensor, target: torch.Tensor, loss, ignore: int) -> bool:
    """The model's loss is the cross-entropy of its logits against the labels shifted by one (and not unshifted)."""
    if target.shape[1] < 2 or not (target[:, 1:] != ignore).any():
        return False
    own = float(loss)
    shifted = _mean_ce(logits[:, :-1], target[:, 1:], ignore)
    unshifted = _mean_ce(logits, target, ignore) if (target != ignore).any() else float("nan")
    close = lambda a: abs(own - a) <= 1e-4 * abs(own) + 1e-5  # noqa: E731
    return close(shifted) and not close(unshifted)


def shifted_by(inputs, target: torch.Tensor, ignore: int, by: int) -> bool:
    """Some integer input of the target's shape [N, T] equals it moved by `by` positions at every
    counted target (by=1: target[t] = input[t + 1], labels shifted already; by=0: the inputs themselves)."""
    found = []
    tree_map(lambda t: found.append(t) if t.shape == target.shape and not t.is_floating_point() and t.dim() == 2 else None, inputs)
    counted = target[:, : target.shape[1] - by] != ignore
    if not counted.any():
        return False
    for ids in found:
        same = target[:, : target.shape[1] - by] == ids[:, by:].to(target.dtype)
        if bool(same[counted].all()):
            return True
    return False
