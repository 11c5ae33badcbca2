"""What a dataset hands the loop, and the batch contract every model and loss sees.

A split is either in-memory tensors (`x`, `y`; the Feeder slices them on the device) or a
map-style Dataset. A dataset item, and so a batch, is `(inputs, target)` or a dict:
- `(inputs, target)`: `inputs` is a tensor (the model gets `model(inputs)`), or a tuple/list of
  tensors (`model(*inputs)`), or a dict of tensors (`model(**inputs)`); `target` is a tensor of
  any shape.
- a dict: the key "target" is the target, every other key is passed as `model(**rest)`. A dict in
  Hugging Face's style, without "target" but with "labels", has its labels as the target (a model that
  takes them itself gets them back through model.loss_arg=labels).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from launch.errors import UserError

TARGET_KEY = "target"
LABELS_KEY = "labels"  # Hugging Face's name for it


@dataclass
class Split:
    """One split: in-memory tensors (x, y), a map-style Dataset, or a stream (an IterableDataset)."""

    x: Any = None  # a tensor, or a tuple/dict of tensors with the samples on the first axis
    y: Optional[torch.Tensor] = None
    dataset: Optional[Dataset] = None

    @property
    def stream(self) -> bool:
        """An IterableDataset: samples come in the order it yields them, and it may have no length."""
        return isinstance(self.dataset, IterableDataset)

    def __len__(self) -> int:
        if self.stream:
            raise TypeError("a stream has no length")
        return len(self.y) if self.dataset is None else len(self.dataset)


@dataclass
class Step:
    """One optimizer step as the data order defines it (launch.data.feeder, launch.data.stream)."""

    batches: Iterator  # yields (inputs, target, n) for each of the step's micro-batches; n = real samples
    n_micro: int  # micro-batches in this step (the same on every rank)
    global_samples: int  # samples all ranks together see in this step
    position: int  # global samples of the epoch consumed after this step (the resume point)
    mine: int  # this rank's real samples in this step
    last: bool  # the epoch's last step


@dataclass
class DataBundle:
    train: Split
    eval: Split
    in_features: int
    num_classes: Optional[int]
    """The output width the data implies: classes for a classifier, 1 for one regression target; None when the dataset does not say."""
    state: dict = field(default_factory=dict)
    """Plain-typed data state saved with checkpoints (class names, standardisation statistics...)."""
    notes: list = field(default_factory=list)
    """Lines the start-up says about the data (rows read, rows cut...), printed once by rank 0."""


def tree_map(fn, tree):
    """Apply fn to every tensor of a tensor, tuple/list or dict of tensors."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, t) for t in tree)
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    return tree


def split_item(item, where: str):
    """A dataset item or collated batch -> (inputs, target); one line naming the problem otherwise."""
    if isinstance(item, dict):
        key = TARGET_KEY if TARGET_KEY in item else LABELS_KEY
        if key not in item:
            raise UserError(f"{where}: a dict item needs a '{TARGET_KEY}' key, or Hugging Face's '{LABELS_KEY}' (got keys {', '.join(map(str, item))})")
        rest = {k: v for k, v in item.items() if k != key}
        return rest, item[key]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    kind = f"a {type(item).__name__} of length {len(item)}" if isinstance(item, (tuple, list)) else f"a {type(item).__name__}"
    raise UserError(f"{where}: an item must be (inputs, target) or a dict with a '{TARGET_KEY}' key, got {kind}")


def check_tensors(tree, where: str) -> None:
    """Every leaf of an item must be a tensor (or a number the collate turns into one)."""
    if isinstance(tree, (tuple, list)):
        for t in tree:
            check_tensors(t, where)
    elif isinstance(tree, dict):
        for t in tree.values():
            check_tensors(t, where)
    elif not isinstance(tree, (torch.Tensor, int, float, np.ndarray, np.number, np.bool_)):  # what default_collate takes
        raise UserError(f"{where}: items must hold tensors (or numpy arrays and numbers), got a {type(tree).__name__}")


def call_model(model, inputs):
    """The batch contract: model(x), model(*inputs) or model(**inputs)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def model_output(out) -> tuple:
    """(the output tensor, how it was found): a tensor as it is, the `logits` of a mapping (a Hugging
    Face ModelOutput), or the first element of a tuple (nanoGPT's (logits, loss))."""
    if isinstance(out, torch.Tensor):
        return out, ""
    if isinstance(out, Mapping):
        logits = out.get("logits")
        if isinstance(logits, torch.Tensor):
            return logits, f"the 'logits' of its {type(out).__name__}"
        raise UserError(
            f"the model returned a {type(out).__name__} with keys {', '.join(map(str, out))} and no 'logits' tensor: return the output "
            "tensor, or a mapping with 'logits'; a model that computes its own loss needs model.loss_arg (labels for Hugging Face)"
        )
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], f"the first element of its {type(out).__name__} of {len(out)}"
    raise UserError(
        f"the model returned a {type(out).__name__}: expected a tensor, a mapping with 'logits' (.logits of a Hugging Face "
        "output) or a tuple whose first element is the output tensor; a model that computes its own loss needs model.loss_arg"
    )
