"""data.name -> a DataBundle: one registry line per data source, each module imported only when used.

A new source is a module in launch/data/ with a `build(cfg) -> DataBundle` (or any function of cfg)
and one line in launch.data.SOURCES; an import path 'pkg.module:Class' is a user's Dataset (launch.data.custom).
"""

from __future__ import annotations

import importlib

from launch.data import SOURCES
from launch.data.types import DataBundle
from launch.errors import UserError


def build_data(cfg) -> DataBundle:
    target = SOURCES.get(cfg.data.name, "launch.data.custom:from_import_path")  # validate() allows only these names or 'pkg.module:Class'
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)(cfg)


def check_sizes(data: DataBundle, cfg, ranks: int, groups: str) -> None:
    """One line, before any model is built, for data a run cannot use: a stream without train.max_steps,
    fewer training samples than one global batch (`ranks` data-parallel `groups`), no evaluation samples."""
    if data.train.stream:
        if not cfg.train.max_steps:
            raise UserError(f"data.name '{cfg.data.name}' is a stream (an IterableDataset): set train.max_steps, there is no length to count epochs by")
    elif len(data.train) < cfg.data.batch_size * ranks:
        raise UserError(
            f"the training set has {len(data.train)} samples, fewer than one global batch "
            f"({cfg.data.batch_size} per process x {ranks} {groups} = {cfg.data.batch_size * ranks})"
        )
    if not data.eval.stream and len(data.eval) == 0:
        raise UserError("the evaluation set is empty")
