"""Calling the user's code (models, datasets, loss functions by import path) with one-line errors.

Whatever the user's module or constructor raises becomes one line that names the import path, the
exception and where in the user's own file it happened (the innermost frame outside torch, this
package and the standard library). `log.debug=true` prints the full traceback before that line.
"""

from __future__ import annotations

import importlib
import os
import sys
import sysconfig
import traceback
from pathlib import Path

from launch.errors import UserError

_LAUNCH_DIR = str(Path(__file__).resolve().parent) + os.sep


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs |= {os.path.dirname(os.__file__)}
    return tuple(str(Path(d).resolve()) + os.sep for d in dirs)


_LIBRARY_DIRS = _library_dirs()


def _is_user_file(filename: str) -> bool:
    if not filename or filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return False
    path = str(Path(filename).resolve())
    return not path.startswith(_LAUNCH_DIR) and not path.startswith(_LIBRARY_DIRS)


def _show(filename: str) -> str:
    """A path relative to the working directory when it lies under it."""
    try:
        rel = os.path.relpath(filename)
    except ValueError:  # another drive (Windows)
        return filename
    return filename if rel.startswith("..") else rel


def where(exc: BaseException) -> str:
    """' (at file:line in func)' for the innermost traceback frame in a user file; '' when none."""
    if isinstance(exc, SyntaxError) and exc.filename and _is_user_file(exc.filename):
        return f" (at {_show(exc.filename)}:{exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _is_user_file(f.filename)]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {_show(f.filename)}:{f.lineno} in {f.name})"


def _describe(exc: BaseException) -> str:
    """'Type: first line of the message'."""
    text = exc.msg if isinstance(exc, SyntaxError) and exc.msg else str(exc)
    first = (text.strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _print_traceback(exc: BaseException) -> None:
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    sys.stderr.flush()


def _missing_itself(e: ModuleNotFoundError, module_name: str) -> bool:
    """The module (or a package above it) does not exist, as opposed to an import inside it failing."""
    return e.name is not None and (module_name == e.name or module_name.startswith(e.name + "."))


def _looked_in() -> str:
    """Where Python looked for a top-level module besides the installed packages: sys.path[0] (the
    script's directory under `python train_single.py`, which is not always the working directory) and PYTHONPATH."""
    cwd = os.getcwd()
    first = os.path.abspath(sys.path[0]) if sys.path and sys.path[0] else cwd
    if first == cwd:
        first = f"the working directory {cwd}"
    else:
        script = bool(sys.argv) and os.path.dirname(os.path.abspath(sys.argv[0])) == first
        label = "the script's directory, " if script else ""
        first = f"{first} ({label}not the working directory {cwd})"
    pythonpath = os.environ.get("PYTHONPATH", "")
    return f"looked in {first}, PYTHONPATH {pythonpath if pythonpath else '(empty)'} and the installed packages"


# Packages the launcher's optional extras install (pyproject.toml [project.optional-dependencies]; a test
# holds the two together): import name -> (extra, what pip installs). A missing one names its extra
# (transformers is in corpus and peft too, for their tokenizers and models: its own extra is hf).
OPTIONAL = {
    "transformers": ("hf", "transformers"),
    "matplotlib": ("plot", "matplotlib"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "sqlalchemy": ("mlflow", "sqlalchemy"),
    "alembic": ("mlflow", "alembic"),
    "lightning": ("bench", "lightning"),
    "accelerate": ("bench", "accelerate"),
    "pyarrow": ("corpus", "pyarrow"),
    "datasets": ("corpus", "datasets"),
    "peft": ("peft", "peft"),
}


def install_hint(missing: str) -> str:
    """'; pip install -e ".[hf]" ...' when `missing` (a module name) belongs to one of the extras, else ''."""
    top = (missing or "").partition(".")[0]
    if top not in OPTIONAL:
        return ""
    extra, package = OPTIONAL[top]
    return f"; {top} is not installed: pip install -e \".[{extra}]\" (the launcher's {extra} extra) or pip install {package}"


def _not_found(e: ModuleNotFoundError, module_name: str) -> str:
    parent, _, leaf = e.name.rpartition(".")
    if not parent and leaf in OPTIONAL:
        return f"cannot import module '{module_name}'{install_hint(leaf)}"
    if parent:  # the package exists, its submodule does not
        places = list(getattr(sys.modules.get(parent), "__path__", []))
        return f"cannot import module '{module_name}': package '{parent}'{f' ({places[0]})' if places else ''} has no module '{leaf}'"
    return f"cannot import module '{module_name}' ({e}); {_looked_in()}: add the directory that holds {leaf}/ or {leaf}.py to PYTHONPATH"


def import_object(path: str, what: str, debug: bool = False):
    """Resolve 'pkg.module:Name'."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # SyntaxError, NameError, a missing dependency: anything the module body raises
        if isinstance(e, ModuleNotFoundError) and _missing_itself(e, module_name):
            raise UserError(f"{what} '{path}': {_not_found(e, module_name)}") from None
        if debug:
            _print_traceback(e)
        hint = install_hint(e.name) if isinstance(e, ModuleNotFoundError) else ""
        raise UserError(f"{what} '{path}': importing module '{module_name}' raised {_describe(e)}{where(e)}{hint}") from None
    return _attribute(module, module_name, attr, f"{what} '{path}'")


def _attribute(module, module_name: str, attr: str, what: str):
    """`Name`, or a dotted `Class.method` (a classmethod or staticmethod factory such as
    transformers:AutoModelForCausalLM.from_config), looked up one part at a time."""
    parts = attr.split(".")
    if not all(p.isidentifier() for p in parts):
        raise UserError(f"{what}: expected 'pkg.module:Name' or 'pkg.module:Class.method' after the colon, got '{attr}'")
    obj, shown = module, f"module '{module_name}'"
    for i, part in enumerate(parts):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserError(f"{what}: {shown} has no '{part}'") from None
        except Exception as e:  # a lazy module (transformers) imports its submodule on attribute access
            hint = install_hint(e.name) if isinstance(e, ModuleNotFoundError) else ""
            raise UserError(f"{what}: looking up '{part}' in {shown} raised {_describe(e)}{where(e)}{hint}") from None
        shown = f"'{module_name}:{'.'.join(parts[:i + 1])}'"
    return obj


def short_name(path: str) -> str:
    """The last name of an import path: 'pkg.mod:fn' -> 'fn', 'pkg.mod:Class.method' -> 'method'
    (what a train.metrics import path is recorded as: eval_<name>)."""
    return path.rpartition(":")[2].rpartition(".")[2]


def call(what: str, fn, *args, debug: bool = False, **kwargs):
    """Call user code; any exception becomes one line naming what failed and where."""
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as e:
        if debug:
            _print_traceback(e)
        at = where(e)
        hint = ""
        if isinstance(e, TypeError) and not at:  # raised by the call itself: the arguments do not fit
            section = what.split(".", 1)[0]
            if section in ("model", "data"):
                hint = f" (called with {kwargs or 'no keyword arguments'}: check {section}.kwargs)"
        raise UserError(f"{what}: {_describe(e)}{at}{hint}") from None


TARGET_KEY, ARGS_KEY = "_target_", "_args_"


def build_kwargs(kwargs: dict, where: str, debug: bool = False) -> dict:
    """model.kwargs / data.kwargs with every nested `{_target_: pkg.module:Name, ...}` built first,
    innermost first (Hydra's convention; `_args_` holds positional arguments). So a Hugging Face model
    takes `config: {_target_: transformers:GPT2Config, n_layer: 2}` and nanoGPT's GPT a GPTConfig,
    with no wrapper class. Plain values pass through unchanged."""
    return {k: _build(v, f"{where}.{k}", debug) for k, v in kwargs.items()}


def _build(value, where: str, debug: bool):
    if isinstance(value, list):
        return [_build(v, f"{where}[{i}]", debug) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    if TARGET_KEY not in value:
        return {k: _build(v, f"{where}.{k}", debug) for k, v in value.items()}
    target = value[TARGET_KEY]
    if not isinstance(target, str) or ":" not in target:
        raise UserError(f"{where}.{TARGET_KEY}: expected an import path 'pkg.module:Name', got {target!r}")
    args = value.get(ARGS_KEY, [])
    if not isinstance(args, list):
        raise UserError(f"{where}.{ARGS_KEY}: expected a list of positional arguments, got {args!r}")
    kwargs = {k: _build(v, f"{where}.{k}", debug) for k, v in value.items() if k not in (TARGET_KEY, ARGS_KEY)}
    fn = import_object(target, where, debug)
    return call(f"{where} ({target})", fn, *[_build(a, where, debug) for a in args], debug=debug, **kwargs)
