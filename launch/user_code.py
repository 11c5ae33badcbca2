"""Calling the user's code (models, datasets, loss functions by import path) with one-line errors."""

from __future__ import annotations

import importlib

from launch.errors import UserError


def import_object(path: str, what: str, debug: bool = False):
    """Resolve 'pkg.module:Name'."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{what} '{path}': cannot import module '{module_name}' ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"{what} '{path}': module '{module_name}' has no '{attr}'") from None


def call(what: str, fn, *args, debug: bool = False, **kwargs):
    """Call user code; a TypeError from bad arguments becomes one line."""
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"{what}: {type(e).__name__}: {first}") from None
