"""A user's own map-style Dataset, by import path: data.name='pkg.module:Class'.

The class is built twice, `Class(split="train", **data.kwargs)` and `Class(split="eval", ...)`.
Its items follow the batch contract of `launch.data.types`. Optional attributes: `num_classes`
(for the built-in MLP with a classification loss) and `in_features`.
"""

from __future__ import annotations

import torch

from launch.data.types import DataBundle, Split, check_tensors, split_item
from launch.errors import UserError
from launch.user_code import call, import_object


def from_import_path(cfg) -> DataBundle:
    name, debug = cfg.data.name, cfg.log.debug
    cls = import_object(name, "data.name", debug)
    train = call(f"data.name '{name}'", cls, split="train", debug=debug, **cfg.data.kwargs)
    ev = call(f"data.name '{name}'", cls, split="eval", debug=debug, **cfg.data.kwargs)
    if len(train) == 0:
        raise UserError(f"data.name '{name}': the training split is empty")
    where = f"data.name '{name}'"
    item = call(f"{where} (item 0)", train.__getitem__, 0, debug=debug)
    inputs, target = split_item(item, f"{where} item 0")
    check_tensors((inputs, target), f"{where} item 0")
    in_features = getattr(train, "in_features", None)
    if in_features is None:
        in_features = torch.as_tensor(inputs).numel() if isinstance(inputs, torch.Tensor) else 0
    num_classes = getattr(train, "num_classes", None) or cfg.model.out_features
    return DataBundle(Split(dataset=train), Split(dataset=ev), int(in_features), int(num_classes) if num_classes else None)
