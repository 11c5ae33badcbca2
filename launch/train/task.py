"""The task: how a batch becomes a loss and metrics. The extension point for your own model.

The loss comes from one of four places (`Task.kind`):
- a built-in `train.loss` (cross_entropy, mse, l1, bce_with_logits) applied to the model's output:
  a tensor, the `logits` of a mapping (a Hugging Face ModelOutput) or the first element of a tuple;
- `train.loss=pkg.module:fn`, `fn(output, target) -> per-element losses` (no reduction), given the
  model's output as it returns it;
- the model's own loss method, `loss(self, batch) -> (loss_sum, count)` (batch = (inputs, target));
- the loss a model computes in its forward (`model.loss_arg`: Hugging Face `labels=`, nanoGPT
  `targets`), declared a mean or a sum by `model.loss_reduction` (launch.train.losses).

Every loss is a sum over elements divided by an element count: samples for a classifier or a
regression, tokens for a sequence model (targets equal to train.ignore_index do not count). The step
weights each rank's sum by the GLOBAL count of its optimizer step, so DDP computes what one process
computes on the whole global batch. Counts are "static" when they follow from shapes alone (no
ignored targets possible); otherwise they are counted and, in DDP, summed over ranks. Before
training, `check` refuses a misfit in one line, including a mean returned where a sum is expected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from launch.data.types import Split, call_model, model_output
from launch.errors import UserError
from launch.models import lightning
from launch.observe.metrics import Metrics, View
from launch.train import losses
from launch.user_code import call, import_object

BUILTIN = ("cross_entropy", "mse", "l1", "bce_with_logits")
CLASSIFICATION = ("cross_entropy", "bce_with_logits")
_ELEMENTWISE = {"mse": F.mse_loss, "l1": F.l1_loss, "bce_with_logits": F.binary_cross_entropy_with_logits}


def _shape(t) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def _pair(loss_sum, count, device) -> torch.Tensor:
    return torch.stack([torch.as_tensor(loss_sum).double(), torch.as_tensor(count).double()]).to(device)


def class_layout(output: torch.Tensor, target: torch.Tensor):
    """(logits [M, C], targets [M]) for cross-entropy: classes last ([N, C] with [N]; [N, T, C]
    with [N, T]) or classes second as torch has it ([N, C, T...] with [N, T...]); None if neither fits."""
    if output.dim() == target.dim() + 1 and output.shape[:-1] == target.shape:
        if output.dim() == 2:
            return output, target  # the classifier case: no reshape at all
        return output.reshape(-1, output.shape[-1]), target.reshape(-1)
    if output.dim() == target.dim() + 1 and output.dim() > 2 and output.shape[0] == target.shape[0] and output.shape[2:] == target.shape[1:]:
        return output.movedim(1, -1).reshape(-1, output.shape[1]), target.reshape(-1)
    return None


class Task:
    def __init__(self, cfg, model: nn.Module):
        self.name = cfg.train.loss
        # the model's own loss: a LightningModule's training_step, or a loss(batch) method (not a
        # `self.loss = nn.CrossEntropyLoss()` submodule, which is a loss of (output, target))
        step = None if cfg.model.loss_arg else lightning.step_loss(model)
        self.method = step or (None if cfg.model.loss_arg else losses.own_method(model))
        trained_by = "" if step else (f"model.loss_arg={cfg.model.loss_arg}" if cfg.model.loss_arg else
                                       "its loss(batch) method" if self.method else f"forward with train.loss={cfg.train.loss}")
        self.lightning_note = lightning.note(model, cfg, trained_by)  # said at start-up, whichever way it trains
        if cfg.model.loss_arg:
            self.kind = "output"
        elif self.method is not None:
            self.kind = "model"
        else:
            self.kind = "function" if self.name not in BUILTIN else self.name
        self.fn = import_object(self.name, "train.loss", cfg.log.debug) if self.kind == "function" else None
        self.own = losses.OwnLoss(cfg) if self.kind == "output" else None
        self.ignore_index = cfg.train.ignore_index
        self.debug = cfg.log.debug
        self.classification = self.kind in CLASSIFICATION
        self.metrics = Metrics(cfg.train.metrics, self.classification, self.debug)  # imports import-path metrics: a failure is one line at start
        self.static = False  # set by decide_counts
        self.per_sample = 1  # target elements per sample (static counts)
        self.classes = None  # cross_entropy: the model's number of classes, seen by check()
        self.output_note = ""  # how the model's output was read, said once at start-up
        self.checked = False  # check() ran on a real batch

    # ------------------------------------------------------------------ training

    def train_loss(self, model: nn.Module, inputs, target):
        """(loss, count): the local mean and its element count (an int) with static counts,
        else the local sum and its count (a tensor or int)."""
        if self.kind == "model":
            return self.method(model, (inputs, target))
        if self.kind == "output":
            return self.own.sum_and_count(model, inputs, target)
        raw = call_model(model, inputs)
        if self.kind == "function":
            per = self.fn(raw, target)
            return per.float().sum(), per.numel()
        output = model_output(raw)[0]
        reduction = "mean" if self.static else "sum"
        if self.kind == "cross_entropy":
            logits, labels = class_layout(output, target)
            loss = F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index, reduction=reduction)
            return loss, (labels.numel() if self.static else (labels != self.ignore_index).sum())
        loss = _ELEMENTWISE[self.kind](output.float(), target.to(torch.float32), reduction=reduction)
        return loss, target.numel()

    # ------------------------------------------------------------------ evaluation

    def eval_sums(self, model: nn.Module, inputs, target, view: bool = False):
        """([loss sum, element count] in float64 for one batch, and the batch's predictions as the
        metrics read them: a launch.observe.metrics.View when `view`, else None)."""
        if self.kind == "model":
            s, c = self.method(model, (inputs, target))
            return _pair(s, c, target.device), None
        if self.kind == "output":
            seen = []  # the forward's output, for import-path metrics: one forward gives loss and predictions

            def forward(*args, **kwargs):
                seen.append(model(*args, **kwargs))
                return seen[-1]

            s, c = self.own.sum_and_count(forward, inputs, target)
            return _pair(s, c, target.device), (self.view(seen[0], target) if view else None)
        raw = call_model(model, inputs)
        if self.kind == "function":
            per = self.fn(raw, target).double()
            return torch.stack([per.sum(), per.new_tensor(float(per.numel()))]), (self.view(raw, target) if view else None)
        output = model_output(raw)[0]
        if self.kind == "cross_entropy":
            logits, labels = class_layout(output, target)
            per = F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index, reduction="none").double()
            sums = torch.stack([per.sum(), (labels != self.ignore_index).sum().double()])
        else:
            per = _ELEMENTWISE[self.kind](output.float(), target.to(torch.float32), reduction="none").double()
            sums = torch.stack([per.sum(), per.new_tensor(float(per.numel()))])
        return sums, (self.view(raw, target) if view else None)

    def view(self, raw, target: torch.Tensor) -> View:
        """The model's output read as the metrics need it: classes (cross_entropy, or a loss function
        given integer targets that pair with the output as cross_entropy's do), binary decisions
        (bce_with_logits), regression values (mse, l1, or a loss function given float targets of
        the output's shape), or none (a model's own loss: import-path metrics only)."""
        output, _ = model_output(raw)
        pair = f"model output {_shape(output)} and target {_shape(target)}"
        if self.kind in ("model", "output"):
            return View(None, output, target, what=f"a model that computes its own loss (the launcher reads no predictions from {pair})")
        layout = class_layout(output, target) if not (target.is_floating_point() or target.dtype == torch.bool) else None
        if self.kind == "cross_entropy" or (self.kind == "function" and layout is not None and layout[0].shape[1] > 1):
            logits, labels = layout
            return View("class", output, target, logits, labels, labels != self.ignore_index, f"train.loss={self.name} ({pair}: classes)")
        if self.kind == "bce_with_logits":
            return View("binary", output, target, output.reshape(-1), target.reshape(-1) > 0.5, what=f"train.loss={self.name} ({pair}: binary decisions)")
        if self.kind in _ELEMENTWISE or (target.is_floating_point() and output.shape == target.shape):
            return View("regression", output, target, output.reshape(-1), target.reshape(-1), what=f"train.loss={self.name} ({pair}: regression values)")
        return View(None, output, target, what=f"train.loss={self.name} with {pair} (neither classes nor values of the output's shape)")

    # ------------------------------------------------------------------ before training

    def check(self, model: nn.Module, inputs, target) -> None:
        """Refuse a model/loss/data misfit, or a metric that does not fit the task, in one line, before anything is written."""
        self.checked = True
        was = model.training
        model.eval()  # no dropout: the check draws no random numbers
        try:
            with torch.no_grad():
                raw = self._check_loss(model, inputs, target)
                self.output_note = "; ".join(filter(None, [self.lightning_note, self.output_note]))
                if not self.metrics.fitted:
                    self._fit_metrics(model, inputs, target, raw)
        finally:
            model.train(was)

    def _check_loss(self, model: nn.Module, inputs, target):
        """The loss's checks; returns the model's output on the batch (None where the loss calls the model itself)."""
        if self.kind == "model":
            losses.check_method_sums(self.method, model, inputs, target, self.debug)
            self.output_note = "" if self.method.mean else "loss: the model's loss(batch) method (sum, count)"  # a training_step: lightning_note says it
            return None
        if self.kind == "output":
            self.output_note = self.own.check(model, inputs, target, self.debug)
            return None
        raw = call(f"model.name forward on a batch of {target.shape[0]}", call_model, model, inputs, debug=self.debug)
        if self.kind == "function":
            self._check_function(raw, target)
            return raw
        output, how = model_output(raw)
        if how:
            self.output_note = f"model output: {how}"
        self._check_pair(output, target, f"train.loss={self.name}")
        hf_style = isinstance(inputs, dict)  # Hugging Face's model(**batch): 'labels' in its convention are the inputs themselves
        if hf_style and self.kind == "cross_entropy" and output.dim() == 3 and target.dim() == 2 and losses.shifted_by(inputs, target, self.ignore_index, 0):
            raise UserError(
                f"train.loss={self.name}: the targets equal the inputs at every counted position (unshifted labels?), so the model would learn to copy "
                "its input: give target[t] = input[t + 1], or for Hugging Face's labels set model.loss_arg=labels and model.loss_reduction=mean_shifted"
            )
        return raw

    def _fit_metrics(self, model: nn.Module, inputs, target, raw) -> None:
        if self.kind == "model":
            asked = ", ".join(n for n in self.metrics.requested if n != "auto")
            what = self.method.label if self.method.mean else "a model with a loss(batch) method"
            raise UserError(f"train.metrics [{asked}]: {what} returns only its loss (evaluated as eval_loss), no predictions to score")
        if raw is None:
            raw = call(f"the model's forward with {self.own.arg}=target", self.own.call, model, inputs, target, debug=self.debug)
        self.metrics.fit(self.view(raw, target))

    def _check_function(self, raw, target: torch.Tensor) -> None:
        per = call(f"train.loss '{self.name}'", self.fn, raw, target, debug=self.debug)
        if not isinstance(per, torch.Tensor) or per.dim() == 0 or not per.is_floating_point():
            out = f"model output {_shape(raw)}" if isinstance(raw, torch.Tensor) else f"a {type(raw).__name__} from the model"
            raise UserError(f"train.loss '{self.name}' must return per-element losses (a float tensor, no reduction); got {per!r:.60} for {out} and target {_shape(target)}")

    def _check_pair(self, output: torch.Tensor, target: torch.Tensor, where: str) -> None:
        pair = f"model output {_shape(output)} and target {_shape(target)} ({str(target.dtype).replace('torch.', '')})"
        if self.kind == "cross_entropy":
            if target.is_floating_point() or target.dtype == torch.bool:
                raise UserError(f"{where} needs integer class targets, got {pair}; for regression set train.loss=mse or l1, for 0/1 targets with one output bce_with_logits")
            layout = class_layout(output, target)
            if layout is None:
                raise UserError(f"{where} cannot pair {pair}: expected [N, C] with [N], [N, T, C] with [N, T], or [N, C, T...] with [N, T...]")
            self.classes = layout[0].shape[1]
            if self.classes == 1:
                raise UserError(f"{where} over a single logit is always 0 ({pair}); a one-output model needs train.loss=mse or l1 (regression) or bce_with_logits (binary)")
            return
        if output.shape != target.shape:
            raise UserError(f"{where} needs output and target of the same shape, got {pair} (no broadcasting); reshape one of them")

    def decide_counts(self, split: Split, target: torch.Tensor) -> None:
        """Static counts when no target can be ignored: known from shapes, no counting collective.
        In-memory class labels are also range-checked here, once, instead of failing mid-epoch."""
        self.per_sample = max(1, target.numel() // max(1, target.shape[0]))
        if self.kind in _ELEMENTWISE:
            self.static = True
        elif self.kind == "cross_entropy" and split.dataset is None:
            y = split.y
            ignored = bool((y == self.ignore_index).any())
            valid = y[y != self.ignore_index]
            classes = self.classes
            if classes and valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= classes):
                raise UserError(f"{self.name}: class targets must lie in [0, {classes}) (or be {self.ignore_index} to ignore), the training data holds {int(valid.min())}..{int(valid.max())}")
            self.static = not ignored
