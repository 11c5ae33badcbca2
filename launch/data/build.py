"""data.name -> a DataBundle: one registry line per data source, each module imported only when used.

A new source is a module in launch/data/ with a `build(cfg) -> DataBundle` (or any function of cfg)
and one line in launch.data.SOURCES; an import path 'pkg.module:Class' is a user's Dataset (launch.data.custom).
"""

from __future__ import annotations

import importlib

from launch.data import SOURCES
from launch.data.types import DataBundle


def build_data(cfg) -> DataBundle:
    target = SOURCES.get(cfg.data.name, "launch.data.custom:from_import_path")  # validate() allows only these names or 'pkg.module:Class'
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)(cfg)
