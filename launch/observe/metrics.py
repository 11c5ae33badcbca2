"""Evaluation metrics beyond the loss (`train.metrics`): which fit the task, what each batch adds,
and their values over the whole evaluation split, the same for any world size.

A batch reaches the metrics as a `View` (made by launch.train.task): its predictions read as classes
(logits [M, C] with labels [M], one row per element: per token for sequences, targets equal to
train.ignore_index marked invalid), as binary decisions (bce_with_logits: one logit per element), as
regression values, or only as the model's raw output (user functions). Two kinds of metric:
- sums: accuracy, top5, mse, mae, and f1_macro (per-class true positives, false positives and false
  negatives: F1 over the whole set is a function of these counts). Each batch adds float64 counts,
  which ride along with the loss's one all-reduce: exact (integers up to 2**53) and O(classes).
- gathered: auroc and import-path functions need every prediction at once. Each rank keeps only what
  they read (one score, or one row of C log-probabilities, per element; a user function gets the
  model's output per sample), and launch.observe.gather brings the rows to rank 0 in sample order; rank 0
  computes and shares the values.
Nothing is computed or kept for a metric that was not asked for.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from launch.config.validate import BUILTIN_METRICS
from launch.errors import UserError
from launch.observe.gather import gather_rows, share
from launch.observe.metric_math import auroc_binary, auroc_ovr_macro, f1_macro
from launch.user_code import call, import_object, short_name

FITS = {"accuracy": ("class", "binary"), "top5": ("class",), "f1_macro": ("class", "binary"), "auroc": ("class", "binary"),
        "mse": ("regression",), "mae": ("regression",)}
GATHERED = ("auroc",)


@dataclass
class View:
    """One batch's predictions as the metrics read them (launch.train.task makes it)."""

    kind: Optional[str]  # class | binary | regression | None (only import-path metrics apply)
    output: torch.Tensor  # the model's output tensor as it returned it, [N, ...]
    target: torch.Tensor  # the batch's targets, [N, ...]
    scores: Optional[torch.Tensor] = None  # class: logits [M, C]; binary: logits [M]; regression: predictions [M]
    labels: Optional[torch.Tensor] = None  # class: [M] integers; binary: [M] bool; regression: [M] values
    valid: Optional[torch.Tensor] = None  # class: [M] bool, labels other than train.ignore_index
    what: str = ""  # the task in words, for a misfit's line

    @property
    def token_level(self) -> bool:
        return self.scores is not None and self.scores.shape[0] != self.target.shape[0]


def _spec(t: torch.Tensor) -> tuple:
    """(dtype, trailing shape) a gathered tensor keeps on every rank, also a rank without samples."""
    return (torch.float32 if t.is_floating_point() else t.dtype), tuple(t.shape[1:])


def _host(output: torch.Tensor, target: torch.Tensor) -> tuple:
    """What an import-path metric is given: CPU copies, float outputs as float32."""
    return (output.detach().float().cpu() if output.is_floating_point() else output.detach().cpu()), target.detach().cpu()


def _as_number(value, name: str) -> float:
    """A metric function's result as a float: a number, or a one-element tensor or array."""
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, numbers.Real):
        try:
            value = item()  # a one-element tensor or numpy array
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"train.metrics '{name}' must return a number (a float or a one-element tensor), got {value!r:.60}")
    return float(value)


class Metrics:
    """The chosen metrics of a run: checked against the task once (`fit`), then one `Tally` per evaluation."""

    def __init__(self, names: list[str], classification: bool, debug: bool = False):
        self.requested = list(dict.fromkeys(names))
        self.classification, self.debug = classification, debug
        self.user = {n: import_object(n, "train.metrics", debug) for n in self.requested if ":" in n}
        # Before fit: 'auto' is what evaluation always reported, accuracy for classification losses.
        self.active = ["accuracy"] if "auto" in self.requested and classification else []
        self.fitted = not any(n != "auto" for n in self.requested)
        self.classes = 0
        self.specs: dict[str, tuple] = {}

    def fit(self, view: View) -> None:
        """Refuse a metric that does not fit the task in one line (before anything is written), call
        each import-path metric once on this batch, and settle what every evaluation computes."""
        active = []
        for name in self.requested:
            if name == "auto":
                if self.classification and view.kind in ("class", "binary"):
                    active.append("accuracy")
            elif name in self.user:
                _as_number(call(f"train.metrics '{name}'", self.user[name], *_host(view.output, view.target), debug=self.debug), name)
                active.append(name)
            else:
                self._check(name, view)
                active.append(name)
        self.active = list(dict.fromkeys(active))
        self.classes = view.scores.shape[1] if view.kind == "class" else 2
        if "auroc" in self.active:
            scores = view.scores if view.kind == "binary" or self.classes > 2 else view.scores[:, 1]
            self.specs["auroc"] = _spec(scores)
        if self.user:
            self.specs["output"], self.specs["target"] = _spec(view.output), _spec(view.target)
        self.fitted = True

    def _check(self, name: str, view: View) -> None:
        reason = _misfit(name, view)
        if reason:
            fits = [m for m in BUILTIN_METRICS if not _misfit(m, view)]
            where = f"; these fit it: {', '.join(fits)}" if fits else "; an import path 'pkg.module:fn' (fn(predictions, targets) -> float) can score it"
            raise UserError(f"train.metrics: {name} {reason}{where}")

    def sum_slots(self) -> dict[str, slice]:
        """Where each summed metric sits in the vector of sums (after the element count at 0)."""
        slots, at = {}, 1
        for name in self.active:
            width = 3 * self.classes if name == "f1_macro" else (1 if name in FITS else 0)
            if name not in GATHERED and width:
                slots[name] = slice(at, at + width)
                at += width
        return slots

    def tally(self, rank: int, world_size: int) -> "Tally":
        return Tally(self, rank, world_size)


class Tally:
    """One evaluation's metric sums and kept rows on this rank."""

    def __init__(self, metrics: Metrics, rank: int, world_size: int):
        self.m, self.rank, self.k = metrics, rank, world_size
        self.slots = metrics.sum_slots()
        self.width = 1 + sum(s.stop - s.start for s in self.slots.values()) if self.slots else 0
        self.kept: dict[str, list] = {}  # name -> [rows, labels or targets, sample ids] per batch
        self.place = None  # a feeder's own map from this rank's sample count to split indices (launch.data.corpus)

    def add(self, view: View, first: int) -> Optional[torch.Tensor]:
        """The batch's sums (float64 [width]) and keep its rows; `first`: this rank's count of samples before it."""
        m = self.m
        if any(n in m.user for n in m.active):
            # kept in host memory until the gather: a user function sees the whole output
            self._keep("output", *_host(view.output, view.target), self._ids(first, view.target.shape[0], 1, "cpu"))
        if "auroc" in m.active:
            scores, labels = _auroc_rows(view, m.classes)
            per = view.scores.shape[0] // max(1, view.target.shape[0])
            ids = self._ids(first, view.target.shape[0], per, scores.device)
            if view.valid is not None:
                ids = ids[view.valid]
            self._keep("auroc", scores, labels, ids)
        if not self.width:
            return None
        return _sums(view, self.slots, self.width, m.classes)

    def _ids(self, first: int, n: int, per: int, device) -> torch.Tensor:
        """The global sample index of each row: rank r holds samples r, r+k, r+2k, ... (launch.data.order)."""
        local = torch.arange(first, first + n, dtype=torch.long, device=device).repeat_interleave(per)
        return self.place(local) if self.place is not None else self.rank + self.k * local

    def _keep(self, name: str, rows: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        specs = [self.m.specs["auroc"]] if name == "auroc" else [self.m.specs["output"], self.m.specs["target"]]
        for t, (_, shape), what in zip((rows, labels), specs, ("output", "target")):
            if tuple(t.shape[1:]) != shape:
                raise UserError(
                    f"train.metrics: the {what} per sample is [{', '.join(map(str, t.shape[1:]))}] in this evaluation batch and "
                    f"[{', '.join(map(str, shape))}] on the first batch; metrics that see every prediction need one shape (pad to a fixed length in data.collate)"
                )
        self.kept.setdefault(name, []).append((rows.to(specs[0][0]), labels, ids))

    def values(self, sums: Optional[torch.Tensor], rt) -> dict:
        """{'eval_<name>': value} in the order asked for; `sums` are already summed over ranks.
        Gathers the kept rows onto rank 0 (a collective: every rank calls this)."""
        m, out, computed = self.m, {}, {}
        gathered = {name: self._gather(name, rt) for name in ("auroc", "output") if m.specs.get(name) and _wanted(m, name)}
        failure = None
        if rt.env.is_main:
            try:
                computed = _on_main(m, gathered)
            except UserError as e:
                failure = e
        names = [n for n in m.active if n in GATHERED or n in m.user]
        shared, ok = share([computed.get(n, math.nan) for n in names], failure is None, rt)
        if failure is not None:
            raise failure
        if not ok:
            raise UserError("train.metrics: rank 0 could not compute a metric (its line says why)")
        computed = dict(zip(names, shared))
        for name in m.active:
            key = "eval_" + short_name(name)
            out[key] = computed[name] if name in computed else _from_sums(name, sums, self.slots[name], m.classes)
        return out

    def _gather(self, name: str, rt):
        dtype, shape = self.m.specs["auroc" if name == "auroc" else "output"]
        parts = self.kept.get(name, [])
        if name == "output":
            tdtype, tshape = self.m.specs["target"]
            empty = (torch.empty((0, *shape), dtype=dtype), torch.empty((0, *tshape), dtype=tdtype), torch.empty(0, dtype=torch.long))
        else:
            empty = (torch.empty((0, *shape), dtype=dtype), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
        rows, labels, ids = (torch.cat([p[i] for p in parts]) if parts else empty[i] for i in range(3))
        return gather_rows([rows, labels], ids, rt)


def _misfit(name: str, view: View) -> str:
    """Why a built-in metric does not fit this task ('' when it does)."""
    if view.kind not in FITS[name]:
        return f"does not fit {view.what}"
    classes = view.scores.shape[1] if view.kind == "class" else 2
    if name == "top5" and classes <= 5:
        return f"needs more than 5 classes; the model's output has {classes} (top5 would always be 1)"
    if name == "auroc" and view.token_level and view.kind == "class" and classes > 2:
        return f"per token over {classes} classes would gather {classes} scores for every token of the evaluation split ({view.what})"
    return ""


def _wanted(m: Metrics, name: str) -> bool:
    return "auroc" in m.active if name == "auroc" else any(n in m.user for n in m.active)


def _on_main(m: Metrics, gathered: dict) -> dict:
    """Rank 0: the gathered metrics from all predictions in sample order."""
    out = {}
    for name in m.active:
        if name == "auroc":
            scores, labels = gathered["auroc"]
            out[name] = auroc_binary(scores, labels.bool()) if scores.dim() == 1 else auroc_ovr_macro(scores, labels)
        elif name in m.user:
            preds, targets = (t.cpu() for t in gathered["output"])
            out[name] = _as_number(call(f"train.metrics '{name}'", m.user[name], preds, targets, debug=m.debug), name)
    return out


def _auroc_rows(view: View, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary: the logit per element. Classes: log-probabilities (the ranking of the probabilities,
    without float32's saturation at 1), column 1 alone for two classes; ignored targets left out."""
    if view.kind == "binary":
        return view.scores.float(), view.labels.long()
    logp = torch.log_softmax(view.scores.float(), dim=1)
    if classes == 2:
        logp = logp[:, 1]
    return logp[view.valid], view.labels[view.valid].long()


def _sums(view: View, slots: dict, width: int, classes: int) -> torch.Tensor:
    """[elements, then each summed metric's counts] in float64 for one batch."""
    sums = torch.zeros(width, dtype=torch.float64, device=view.target.device)
    valid = view.valid
    if view.kind == "regression":
        sums[0] = view.scores.numel()
        if "mse" in slots:
            sums[slots["mse"]] = F.mse_loss(view.scores.float(), view.labels.float(), reduction="none").double().sum()
        if "mae" in slots:
            sums[slots["mae"]] = F.l1_loss(view.scores.float(), view.labels.float(), reduction="none").double().sum()
        return sums
    if view.kind == "binary":
        pred, labels = (view.scores > 0).long(), view.labels.long()
        valid = torch.ones_like(labels, dtype=torch.bool)
    else:
        pred, labels = view.scores.argmax(dim=1), view.labels.long()
    sums[0] = valid.sum()
    if "accuracy" in slots:
        sums[slots["accuracy"]] = ((pred == labels) & valid).sum()
    if "top5" in slots:
        sums[slots["top5"]] = ((view.scores.topk(5, dim=1).indices == labels[:, None]).any(dim=1) & valid).sum()
    if "f1_macro" in slots:
        p, t = pred[valid], labels[valid]
        tp = torch.bincount(t[p == t], minlength=classes)[:classes]
        fp = torch.bincount(p, minlength=classes)[:classes] - tp
        fn = torch.bincount(t, minlength=classes)[:classes] - tp
        sums[slots["f1_macro"]] = torch.cat([tp, fp, fn]).double()
    return sums


def _from_sums(name: str, sums: torch.Tensor, slot: slice, classes: int) -> float:
    elements = float(sums[0])
    if name == "f1_macro":
        tp, fp, fn = sums[slot].reshape(3, classes)
        return f1_macro(tp, fp, fn)
    return float(sums[slot][0]) / elements if elements else math.nan
