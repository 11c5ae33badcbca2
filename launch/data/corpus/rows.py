"""Tabular rows: data.feature_columns (columns; default every other numeric column) and data.target, as the
CSV path has them. Numbers become float32 features; a list-valued column becomes that many features
(one length per column). The target is a class index (integers are indices; strings are mapped to
their sorted distinct values, whose names are saved with the run), a float for train.loss=mse/l1,
or a 0/1 float for bce_with_logits; a list-valued target is a float vector (multi-label, multi-output).
"""

from __future__ import annotations

import numpy as np
import torch

from launch.data.corpus.files import need
from launch.data.corpus.index import shared
from launch.data.labels import check_many_classes
from launch.data.tabular import REGRESSION_LOSSES
from launch.errors import UserError

STATS_UNITS = 64  # logical units (spread over the split) that estimate the standardisation


def _numeric(t) -> bool:
    pa = need("pyarrow", "corpus")
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)


def _listy(t) -> bool:
    pa = need("pyarrow", "corpus")
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def usable(t) -> bool:
    return _numeric(t) or (_listy(t) and _numeric(t.value_type))


def columns(schema, d, where: str) -> tuple[list[str], str]:
    """(feature columns, target column) checked against the schema."""
    names = schema.names
    shown = f"(columns: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''})"
    target = d.target or names[-1]
    if target not in names:
        raise UserError(f"{where}: no column '{target}' for data.target {shown}")
    features = list(d.feature_columns) or [n for n in names if n != target and usable(schema.field(n).type)]
    for f in features:
        if f not in names:
            raise UserError(f"{where}: no column '{f}' for data.feature_columns {shown}")
        if not usable(schema.field(f).type):
            raise UserError(f"{where}: column '{f}' is {schema.field(f).type}; a feature must be numeric or a list of numbers")
    if not features:
        raise UserError(f"{where}: no numeric column besides the target '{target}' to use as features (set data.feature_columns)")
    if target in features:
        raise UserError(f"{where}: column '{target}' is both the target and a feature")
    return features, target


def to_matrix(col, where: str, name: str, width=None) -> np.ndarray:
    """An Arrow column -> float32 [rows, width] (what the model gets); lists must all have one length."""
    pa = need("pyarrow", "corpus")
    col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    n = len(col)
    if _listy(col.type):
        if pa.types.is_fixed_size_list(col.type):
            w = col.type.list_size
        else:
            lengths = np.diff(np.asarray(col.offsets)) if n else np.zeros(0, dtype=np.int64)
            w = int(lengths[0]) if n else (width or 0)
            if n and (lengths != w).any():
                raise UserError(f"{where}: column '{name}' holds lists of length {w} and {int(lengths[lengths != w][0])}; a column needs one length")
        values = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        out = values.reshape(n, w)
    else:
        out = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, 1)
    if width is not None and out.shape[1] != width:
        raise UserError(f"{where}: column '{name}' holds lists of length {out.shape[1]}, earlier rows {width}")
    return out


class Tabular:
    """Makes a logical unit's rows into (features float32 [n, F], targets) and batches of them."""

    def __init__(self, features: list[str], target: str, kind: str, names=None, widths=None, state=None, binary: bool = False):
        self.features, self.target, self.kind, self.names, self.binary = features, target, kind, names, binary
        self.widths = widths or {}
        self.state = state or {}
        self._index = {n: i for i, n in enumerate(names)} if names else None

    @property
    def columns(self) -> list[str]:
        return [*self.features, self.target]

    def make(self, table, where: str) -> dict:
        parts = [to_matrix(table.column(f), where, f, self.widths.get(f)) for f in self.features]
        x = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        if not np.isfinite(x).all():
            raise UserError(f"{where}: column '{_column_of(x, parts, self.features)}' holds a non-finite value")
        if "mean" in self.state:
            x = (x - np.asarray(self.state["mean"], dtype=np.float32)) / np.asarray(self.state["std"], dtype=np.float32)
        return {"x": x, "y": self._targets(table.column(self.target), where)}

    def _targets(self, col, where: str) -> np.ndarray:
        y = self._classes(col, where)
        return y.astype(np.float32)[:, None] if self.binary else y

    def _classes(self, col, where: str) -> np.ndarray:
        if self.kind == "names":
            values = col.to_pylist()
            try:
                return np.asarray([self._index[v] for v in values], dtype=np.int64)
            except KeyError as e:
                raise UserError(f"{where}: label {e.args[0]!r} is not one of the classes") from None
        y = to_matrix(col, where, self.target, self.widths.get(self.target))
        if not np.isfinite(y).all():
            raise UserError(f"{where}: the target '{self.target}' holds a non-finite value")
        if self.kind == "index":
            if (y < 0).any() or (y != np.round(y)).any() or (y >= len(self.names)).any():
                raise UserError(f"{where}: target '{self.target}' holds {y[(y < 0) | (y != np.round(y)) | (y >= len(self.names))][0]:g}, not a class index in [0, {len(self.names)})")
            return y[:, 0].astype(np.int64)
        return y.astype(np.float32)

    @staticmethod
    def batch(arrays: dict, idx) -> tuple:
        # index_select: x[idx] on a [N, F] tensor takes milliseconds in torch 2.13 (microseconds this way)
        return arrays["x"].index_select(0, idx), arrays["y"].index_select(0, idx)

    def sample_bytes(self) -> int:
        return 4 * (sum(self.widths.get(f, 1) for f in self.features) + 1)


def _column_of(x, parts, names) -> str:
    at = 0
    for part, name in zip(parts, names):
        if not np.isfinite(x[:, at : at + part.shape[1]]).all():
            return name
        at += part.shape[1]
    return names[0]


def _summary(reader, target: str, units: list) -> dict:
    """min, max, integral?, and the distinct values of a string target, over some physical units."""
    pa, pc = need("pyarrow", "corpus"), need("pyarrow.compute", "corpus")
    lo, hi, integral, names = None, None, True, set()
    for p in units:
        col = reader.physical(p).column(target)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            names.update(v for v in pc.unique(col).to_pylist() if v is not None)
            continue
        if _listy(col.type) or not len(col):
            continue
        mm = pc.min_max(col)
        lo = mm["min"].as_py() if lo is None else min(lo, mm["min"].as_py())
        hi = mm["max"].as_py() if hi is None else max(hi, mm["max"].as_py())
        if pa.types.is_floating(col.type):
            integral = integral and bool(pc.all(pc.equal(col, pc.round(col))).as_py())
    return {"min": lo, "max": hi, "integral": integral, "names": sorted(names)}


def target_kind(corpus, reader, target: str, loss: str, many: bool) -> tuple[str, list | None]:
    """('index' | 'names' | 'float', class names): read the target column once (split over the ranks)."""
    t = corpus.schema.field(target).type
    if loss in REGRESSION_LOSSES or _listy(t):
        return "float", None
    if not (usable(t) or str(t) in ("string", "large_string")):
        raise UserError(f"{corpus.spec}: target column '{target}' is {t}; class labels must be integers or strings")
    n_phys = len(corpus.phys["rows"])
    chunks = [list(range(i, min(n_phys, i + 64))) for i in range(0, n_phys, 64)]
    parts = shared(lambda units: _summary(reader, target, units), chunks)
    names = sorted({v for p in parts for v in p["names"]})
    if names:
        kind = "names"
    else:
        lows, highs = [p["min"] for p in parts if p["min"] is not None], [p["max"] for p in parts if p["max"] is not None]
        if not all(p["integral"] for p in parts):
            raise UserError(f"{corpus.spec}: target '{target}' holds non-integer numbers; class labels must be integers or strings (for regression set train.loss=mse or l1)")
        if min(lows) < 0:
            raise UserError(f"{corpus.spec}: target '{target}' holds {min(lows)}; integer class labels are indices from 0")
        names, kind = [str(i) for i in range(int(max(highs)) + 1)], "index"
        check_many_classes(names, corpus.rows, many, corpus.spec)
    if loss == "bce_with_logits":
        if len(names) != 2:
            raise UserError(f"{corpus.spec}: train.loss=bce_with_logits needs two classes here, the target holds {len(names)}")
        return kind, names
    if len(names) < 2:
        raise UserError(f"{corpus.spec}: the target '{target}' holds a single class ({names[0]!r}); need at least two")
    return kind, names


def standardisation(units_source, split_units: list) -> dict:
    """Per-feature mean and std, estimated on up to STATS_UNITS logical units spread evenly over the
    training split (a bounded read, the same on every rank); a constant feature keeps std 1."""
    picks = sorted({split_units[int(i)] for i in np.linspace(0, len(split_units) - 1, min(STATS_UNITS, len(split_units)))})
    parts = shared(lambda c: _moments(units_source.get(c)["x"]), picks)
    n = sum(p[0] for p in parts)
    s1 = np.sum([p[1] for p in parts], axis=0)
    s2 = np.sum([p[2] for p in parts], axis=0)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    std[std == 0] = 1.0
    return {"mean": mean.tolist(), "std": std.tolist(), "estimated_from_rows": int(n)}


def _moments(x: np.ndarray) -> tuple:
    x = x.astype(np.float64)
    return len(x), x.sum(axis=0), (x * x).sum(axis=0)

