"""Calling the user's code (models, datasets, loss functions by import path) with one-line errors.

Whatever goes wrong inside user code, while importing it, constructing it or calling it, becomes
one line: what was being done, the exception's type and message, and where in the user's file it
happened (the innermost traceback frame outside torch, this package and the standard library).
With log.debug=true the full traceback is printed first.
"""

from __future__ import annotations

import importlib
import os
import sys
import sysconfig
import traceback

from launch.errors import UserError

_NOT_USER = tuple(
    os.path.realpath(p) + os.sep
    for p in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], os.path.dirname(os.path.abspath(__file__))}
)


def where(exc: BaseException) -> str:
    """'(at path:line in function)' for the innermost frame in the user's own files, or ''."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" (at {_short(exc.filename)}:{exc.lineno})"
    user = [f for f in traceback.extract_tb(exc.__traceback__) if not os.path.realpath(f.filename).startswith(_NOT_USER) and not f.filename.startswith("<")]
    if not user:
        return ""
    f = user[-1]
    return f" (at {_short(f.filename)}:{f.lineno} in {f.name})"


def _short(path: str) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def _fail(what: str, exc: BaseException, debug: bool) -> UserError:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    first = (str(exc).strip().splitlines() or [""])[0]
    return UserError(f"{what}: {type(exc).__name__}: {first}{where(exc)}" + ("" if debug else " (log.debug=true shows the traceback)"))


def import_object(path: str, what: str, debug: bool = False):
    """Resolve 'pkg.module:Name'."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the named module itself is missing
            raise UserError(f"{what} '{path}': cannot import module '{module_name}' ({e})") from None
        raise _fail(f"{what} '{path}': importing module '{module_name}' failed", e, debug) from None
    except Exception as e:  # the user's module raised while it was imported (SyntaxError, NameError, ...)
        raise _fail(f"{what} '{path}': importing module '{module_name}' failed", e, debug) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"{what} '{path}': module '{module_name}' has no '{attr}'") from None


def call(what: str, fn, *args, debug: bool = False, **kwargs):
    """Call user code; any exception becomes one line (UserErrors pass through)."""
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as e:
        raise _fail(what, e, debug) from None
