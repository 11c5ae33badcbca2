"""What a dataset hands the loop, and the batch contract every model and loss sees.

A split is either in-memory tensors (`x`, `y`; the Feeder slices them on the device) or a
map-style Dataset. A dataset item, and so a batch, is `(inputs, target)` or a dict:
- `(inputs, target)`: `inputs` is a tensor (the model gets `model(inputs)`), or a tuple/list of
  tensors (`model(*inputs)`), or a dict of tensors (`model(**inputs)`); `target` is a tensor of
  any shape.
- a dict: the key "target" is the target, every other key is passed as `model(**rest)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from launch.errors import UserError

TARGET_KEY = "target"


@dataclass
class Split:
    """One split: either in-memory tensors (x, y) or a map-style Dataset."""

    x: Any = None  # a tensor, or a tuple/dict of tensors with the samples on the first axis
    y: Optional[torch.Tensor] = None
    dataset: Optional[Dataset] = None

    def __len__(self) -> int:
        return len(self.y) if self.dataset is None else len(self.dataset)


@dataclass
class DataBundle:
    train: Split
    eval: Split
    in_features: int
    num_classes: Optional[int]
    """The output width the data implies: classes for a classifier, 1 for one regression target; None when the dataset does not say."""
    state: dict = field(default_factory=dict)
    """Plain-typed data state saved with checkpoints (class names, standardisation statistics...)."""


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
        if TARGET_KEY not in item:
            raise UserError(f"{where}: a dict item needs a '{TARGET_KEY}' key (got keys {', '.join(map(str, item))})")
        rest = {k: v for k, v in item.items() if k != TARGET_KEY}
        return rest, item[TARGET_KEY]
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
    elif not isinstance(tree, (torch.Tensor, int, float)):
        raise UserError(f"{where}: items must hold tensors, got a {type(tree).__name__}")


def call_model(model, inputs):
    """The batch contract: model(x), model(*inputs) or model(**inputs)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
