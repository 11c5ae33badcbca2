"""A user's own Dataset (map-style) or IterableDataset (a stream), by import path: data.name='pkg.module:Class'.

The class is built twice, `Class(split="train", **data.kwargs)` and `Class(split="eval", ...)`.
Its items follow the batch contract of `launch.data.types`. Optional attributes: `num_classes`
(for the built-in MLP with a classification loss) and `in_features`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import IterableDataset

from launch.data.types import DataBundle, Split, check_tensors, split_item
from launch.errors import UserError
from launch.train.randomness import preserved
from launch.user_code import build_kwargs, call, import_object


def from_import_path(cfg) -> DataBundle:
    name, debug = cfg.data.name, cfg.log.debug
    where = f"data.name '{name}'"
    cls = import_object(name, "data.name", debug)
    train = call(where, cls, split="train", debug=debug, **build_kwargs(cfg.data.kwargs, "data.kwargs", debug))
    ev = call(where, cls, split="eval", debug=debug, **build_kwargs(cfg.data.kwargs, "data.kwargs", debug))
    if isinstance(train, IterableDataset):  # a stream: its first item, from a pass of its own
        with preserved():
            item = call(f"{where} (first item)", next, iter(train), None, debug=debug)
        if item is None:
            raise UserError(f"{where}: the training stream yields nothing")
    else:
        if len(train) == 0:
            raise UserError(f"{where}: the training split is empty")
        with preserved():
            item = call(f"{where} (item 0)", train.__getitem__, 0, debug=debug)
    inputs, target = split_item(item, f"{where} item 0")
    check_tensors((inputs, target), f"{where} item 0")
    in_features = getattr(train, "in_features", None)
    if in_features is None:
        in_features = torch.as_tensor(inputs).numel() if isinstance(inputs, (torch.Tensor, np.ndarray)) else 0
    num_classes = getattr(train, "num_classes", None) or cfg.model.out_features
    return DataBundle(Split(dataset=train), Split(dataset=ev), int(in_features), int(num_classes) if num_classes else None)
