"""Reading settings: the YAML file, `key=value` overrides, type checks; saving and comparing configs.

Every problem is a `UserError` naming the key (or the file and line), raised before any process
group or file exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from launch.checkpoint.integrity import atomic_write_text
from launch.config.fields import Config
from launch.config.validate import validate
from launch.config.yaml_loader import MAX_CONFIG_BYTES, yaml_text as _yaml
from launch.errors import UserError


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp) -> Any:
    """Check `value` against annotation `tp`; return it (ints widen to float). Raise UserError otherwise."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(key, value, args[0])
    if origin is typing.Literal:  # a fixed set of choices
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no/true/false as booleans
            value = ("on" if value else "off") if "on" in choices else ("true" if value else "false")
        if value not in choices:
            raise UserError(f"{key}: must be one of {', '.join(choices)}, got '{value}'")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list of {_type_name(inner)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}{_colon_hint(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan / .inf parse as floats
            raise UserError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            return "true" if value else "false"  # YAML reads `log.progress=false` as a bool
        if isinstance(value, (int, float)):
            return str(value)  # e.g. run.name=2024 parsed as a number
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported annotation {tp} for {key}")


def _colon_hint(value: Any) -> str:
    """'d_model:32' where a mapping belongs: YAML reads `name:value` without a space as one string."""
    if not isinstance(value, str) or not re.search(r"[^\s:]:[^\s:]", value):
        return ""
    pairs = [f"{k}: {v}" for k, _, v in (w.partition(":") for w in value.split())]
    return f" (YAML needs a space after the colon: write {{{', '.join(pairs)}}}, or '{pairs[0]}' on a line of its own)"


def _unknown(key: str, valid: list[str]) -> UserError:
    hint = difflib.get_close_matches(key, valid, n=1)
    return UserError(f"unknown config key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))


def _apply(cfg: Config, items, patch: bool = False) -> None:
    """Set (key, value) pairs in order (a key given again wins). patch=True (the command line): a mapping setting
    (model.kwargs, data.kwargs) takes nested keys (model.kwargs.a.b=1) and merges as an RFC 7386 patch (null deletes)."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for key, value in items:
        section_name, _, name = key.partition(".")
        name, dot, nested = name.partition(".")
        if section_name not in sections or not name:
            raise _unknown(key, [f"{s}.{f.name}" for s in sections for f in dataclasses.fields(sections[s].default_factory)])
        section = getattr(cfg, section_name)
        hints = typing.get_type_hints(type(section))
        if name not in hints:
            raise _unknown(key, [f"{section_name}.{n}" for n in hints])
        if dataclasses.is_dataclass(hints[name]):  # a nested section (model.lora): model.lora.r=8, or a mapping
            _apply_nested(key, getattr(section, name), nested if dot else "", value)
            continue
        if dot and not (hints[name] is dict and patch):
            where = "in a file, nest them as YAML" if hints[name] is dict else "only model.kwargs and data.kwargs do"
            raise UserError(f"unknown config key '{key}': {section_name}.{name} takes no dotted sub-keys here ({where})")
        if hints[name] is dict and patch:
            setattr(section, name, _merge_patch(getattr(section, name), _nest(key, nested.split(".") if dot else [], value)) or {})
        else:
            setattr(section, name, _coerce(key, value, hints[name]))


def _apply_nested(key: str, sub, name: str, value: Any) -> None:
    """A nested section's field by its dotted name, or the whole section as a mapping of its fields."""
    hints = typing.get_type_hints(type(sub))
    items = [(name, value)] if name else list(_coerce(key, value, dict).items())
    for field_name, v in items:
        full = f"{key}.{field_name}" if not name else key
        if field_name not in hints:
            raise _unknown(full, [f"{key.rpartition('.' + name)[0] if name else key}.{n}" for n in hints])
        setattr(sub, field_name, _coerce(full, v, hints[field_name]))


def _nest(key: str, parts: list[str], value: Any) -> Any:
    """model.kwargs.a.b=1 -> {a: {b: 1}}; the whole setting (no parts) takes a mapping, or null to empty it."""
    if not parts:
        return None if value is None else _coerce(key, value, dict)
    if not all(parts):
        raise UserError(f"{key}: empty key between dots")
    for part in reversed(parts):
        value = {part: value}
    return value


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: a mapping patch merges key by key (null deletes), anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            merged.pop(k, None)
        else:
            merged[k] = _merge_patch(merged.get(k), v)
    return merged


def _flatten(tree: Any, where: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise UserError(f"{where}: expected a mapping of sections (run, model, data, train, dist, ckpt, log)")
    flat = {}
    for section, body in tree.items():
        if not isinstance(body, dict):
            raise UserError(f"{where}: section '{section}' must be a mapping, got {body!r}{_colon_hint(body)}")
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    return flat


def read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # not stat(): a pipe or /proc file reports size 0
        if len(raw) > MAX_CONFIG_BYTES:
            raise UserError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a few kilobytes (is it the data file?)")
        text = raw.decode("utf-8-sig")  # UTF-8 whatever the locale; a byte-order mark (Notepad, Excel) is dropped
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        tree = _yaml(text, path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"invalid YAML in {path}{where}: {problem}") from None
    return tree or {}


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"expected key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = _yaml(raw, "the command line") if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load(config_path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Build the config: defaults, then the YAML file, then `key=value` overrides; validate it."""
    cfg = Config()
    if config_path:
        _apply(cfg, _flatten(read_yaml(config_path), config_path).items())
    _apply(cfg, [parse_override(o) for o in overrides or []], patch=True)  # in order: a key given again later wins
    if not cfg.run.name:
        cfg.run.name = Path(config_path).stem if config_path else "default"
    if not cfg.run.dir:
        cfg.run.dir = os.path.join("runs", cfg.run.name)
    validate(cfg)
    return cfg


def from_dict(tree: dict) -> Config:
    """Rebuild a config saved in a run directory or checkpoint."""
    cfg = Config()
    _apply(cfg, _flatten(tree, "saved config").items())
    validate(cfg)
    return cfg


def save(cfg: Config, path: Path) -> None:
    """Write the resolved config atomically (temporary name, fsync, rename): a kill or a full disk
    never leaves half a file; a failed write is one line naming it."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False), what="config")
