"""CSV and NPZ datasets, and the feature transform that predict replays.

Both build in-memory tensors (the Feeder slices them on the device). Labels (launch.data.labels) may
be integers or strings: the sorted distinct labels of all files become class indices, and their names
go into DataBundle.state so predictions come back as the original labels. A missing value, in a
feature or a label, is refused naming its file, line and column (npz: its index). Standardisation statistics
are computed on the training split only and stored in the state as well. The state holds only
plain lists, floats and strings (checkpoints load with weights_only=True).
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from launch.data.labels import REGRESSION_LOSSES, check_labels, check_many_classes, class_names, encode, regression_targets
from launch.data.types import DataBundle, Split
from launch.errors import UserError

__all__ = ["REGRESSION_LOSSES", "apply_transform", "build_csv", "build_npz", "csv_features", "encode", "npz_arrays", "regression_targets"]

# --------------------------------------------------------------------------- the shared transform


def apply_transform(x: torch.Tensor, state: dict) -> torch.Tensor:
    """Raw features -> model inputs: multiply by state['scale'], then (x - mean) / std.
    mean/std are scalars or flat per-feature lists (reshaped to one sample's shape)."""
    x = x.float()
    if "scale" in state:
        x = x * state["scale"]
    if "mean" in state:
        shape = x.shape[1:]
        mean, std = (torch.tensor(state[k], dtype=torch.float32) for k in ("mean", "std"))
        x = (x - mean.reshape(shape if mean.numel() > 1 else ())) / std.reshape(shape if std.numel() > 1 else ())
    return x


def fit_standardizer(x: torch.Tensor) -> dict:
    """Per-feature mean and std of the training split (constant features keep std 1: centred, not blown up)."""
    flat = x.double().reshape(len(x), -1)
    std = flat.std(dim=0, unbiased=False)
    std[std == 0] = 1.0
    return {"mean": flat.mean(dim=0).tolist(), "std": std.tolist()}


def split_rows(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded hold-out split (identical on every rank); both parts keep file order."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(n * fraction)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _bundle(x_tr, lab_tr, x_ev, lab_ev, cfg, state: dict, where: str) -> DataBundle:
    """Shared tail of csv and npz: targets (class indices, or floats for regression), optional standardisation, the bundle."""
    d = cfg.data
    if cfg.train.loss in REGRESSION_LOSSES:
        if d.standardize:
            state.update(fit_standardizer(x_tr))
        x_tr, x_ev = apply_transform(x_tr, state), apply_transform(x_ev, state)
        train, ev = Split(x_tr, regression_targets(lab_tr, where)), Split(x_ev, regression_targets(lab_ev, where))
        return DataBundle(train, ev, int(x_tr[0].numel()), 1, state)  # one output per target
    names = class_names(lab_tr + lab_ev)
    if len(names) < 2:
        raise UserError(f"{where}: the labels hold a single class ({names[0]!r}); need at least two")
    check_many_classes(names, len(lab_tr) + len(lab_ev), d.many_classes, where)
    state["class_names"] = names
    if d.standardize:
        state.update(fit_standardizer(x_tr))
    x_tr, x_ev = apply_transform(x_tr, state), apply_transform(x_ev, state)
    train = Split(x_tr, encode(lab_tr, names, where))
    ev = Split(x_ev, encode(lab_ev, names, where))
    if cfg.train.loss == "bce_with_logits":  # binary: one logit per sample, float 0/1 targets
        if len(names) != 2:
            raise UserError(f"{where}: train.loss=bce_with_logits needs two classes here, the labels hold {len(names)}")
        train, ev = Split(train.x, train.y.float()[:, None]), Split(ev.x, ev.y.float()[:, None])
        return DataBundle(train, ev, int(x_tr[0].numel()), 1, state)
    return DataBundle(train, ev, int(x_tr[0].numel()), len(names), state)


# --------------------------------------------------------------------------- csv


def read_csv(path: str, header: bool) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(column names, [(line number, fields)]); blank lines skipped, ragged rows refused."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"csv file not found: {path}")
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:  # Excel starts a UTF-8 csv with a byte-order mark
            reader = csv.reader(f)
            rows = [(reader.line_num, [c.strip() for c in r]) for r in reader if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read csv file {path}: {e}") from None
    if not rows:
        raise UserError(f"csv file {path} is empty")
    if header:
        names, rows = rows[0][1], rows[1:]
    else:
        names = [str(i) for i in range(len(rows[0][1]))]
    for line, r in rows:
        if len(r) != len(names):
            raise UserError(f"{path} line {line}: {len(r)} fields, expected {len(names)}")
    if not rows:
        raise UserError(f"csv file {path} has no data rows")
    return names, rows


def column_index(names: list[str], key: str, header: bool, path: str, what: str) -> int:
    """A column by name (header) or by 0-based index (no header; negative counts from the end)."""
    if header:
        if key in names:
            return names.index(key)
        raise UserError(f"{path}: no column '{key}' for {what} (columns: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''})")
    try:
        i = int(key)
    except ValueError:
        raise UserError(f"{what}={key!r}: with data.header=false columns are addressed by index (0-based)") from None
    if not -len(names) <= i < len(names):
        raise UserError(f"{what}={i}: {path} has only {len(names)} columns")
    return i % len(names)


def to_floats(rows, cols: list[int], names: list[str], path: str) -> torch.Tensor:
    try:
        values = [[float(r[c]) for c in cols] for _, r in rows]
    except ValueError:
        values = None
    x = torch.tensor(values, dtype=torch.float64) if values is not None else None
    if x is None or not torch.isfinite(x).all():
        for line, r in rows:  # slow path only to name the first bad cell
            for c in cols:
                try:
                    ok = np.isfinite(float(r[c]))
                except ValueError:
                    ok = False
                if not ok:
                    raise UserError(f"{path} line {line}, column '{names[c]}': feature value {r[c]!r} is not a finite number")
    return x  # float64: standardisation statistics come from the exact values; apply_transform casts


def csv_features(path: str, header: bool, target: str, ignore=(), feature_columns: Optional[list[str]] = None, regression: bool = False,
                 strict: bool = True):
    """Read features and labels from a csv file. target '' is the last column. feature_columns=None
    (training): every column but the target and ignored ones. Given (predict/eval files): those
    columns, and the target only if the file has it. A missing label (regression: a value that is
    not a finite number) is refused unless strict=False (predictions). Returns (x, labels or None, features, target name or None)."""
    names, rows = read_csv(path, header)
    if feature_columns is not None and not header and len(names) == len(feature_columns):
        t, skip = None, set()  # a header-less file of just the features
    elif feature_columns is not None and header and target not in names:
        t, skip = None, set()
    else:
        t = len(names) - 1 if target == "" else column_index(names, target, header, path, "data.target")
        skip = {column_index(names, k, header, path, "data.ignore") for k in ignore}
    if feature_columns is not None and header:
        cols = [column_index(names, k, True, path, "a feature the model was trained on") for k in feature_columns]
    else:
        cols = [i for i in range(len(names)) if i != t and i not in skip]
    if feature_columns is not None and len(cols) != len(feature_columns):
        raise UserError(f"{path}: {len(names)} columns; the model expects {len(feature_columns)} features (optionally plus the target column)")
    if not cols:
        raise UserError(f"{path}: no feature columns left")
    x = to_floats(rows, cols, names, path)
    labels = None
    if t is not None:
        labels = [r[t] for _, r in rows]
        if strict:
            check_labels(labels, (f"line {line}, column '{names[t]}'" for line, _ in rows), regression, path)
    return x, labels, [names[c] for c in cols], (names[t] if t is not None else None)


def train_eval(d, x, labels, val):
    """(x_train, labels_train, x_eval, labels_eval): the separate validation file if given, else a seeded split."""
    if val is not None:
        return x, labels, *val
    tr, ev = split_rows(len(x), d.val_fraction, d.seed)
    return x[tr], [labels[i] for i in tr.tolist()], x[ev], [labels[i] for i in ev.tolist()]


def build_csv(cfg) -> DataBundle:
    d = cfg.data
    regression = cfg.train.loss in REGRESSION_LOSSES
    x, labels, features, target = csv_features(d.path, d.header, d.target, d.ignore, regression=regression)
    if d.val_path:
        x_ev, lab_ev, _, _ = csv_features(d.val_path, d.header, target, d.ignore, features, regression)
        if lab_ev is None:
            raise UserError(f"{d.val_path}: no label column '{target}' (data.val_path needs the same columns as data.path)")
    x_tr, lab_tr, x_ev, lab_ev = train_eval(d, x, labels, (x_ev, lab_ev) if d.val_path else None)
    state = {"kind": "csv", "header": d.header, "feature_columns": features, "target": target, "ignore": list(d.ignore)}
    return _bundle(x_tr, lab_tr, x_ev, lab_ev, cfg, state, d.path)


# --------------------------------------------------------------------------- npz


def npz_arrays(path: str, x_key: str, y_key: str, need_y: bool = True, regression: bool = False, strict: bool = True):
    """(x tensor, labels as strings or None) from an .npz file; pickled object arrays are refused.
    strict=False (predictions): missing labels are kept as they are, not refused."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"npz file not found: {path}")
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = list(z.keys())
            if x_key not in keys:
                raise UserError(f"{path}: no array '{x_key}' (data.x_key; arrays: {', '.join(keys)})")
            x = z[x_key]
            y = z[y_key] if y_key in keys else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"cannot read npz file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if y is None and need_y:
        raise UserError(f"{path}: no array '{y_key}' (data.y_key; arrays: {', '.join(keys)})")
    if x.ndim < 2 or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise UserError(f"{path}: '{x_key}' must be a numeric array of shape (samples, features...), got {x.dtype} {x.shape}")
    if not np.isfinite(x).all():
        first = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
        raise UserError(f"{path}: '{x_key}' holds non-finite values (the first: {x[first]} at sample {first[0]}, "
                        f"feature {first[1:] if len(first) > 2 else first[1]}); fill them in or drop those samples")
    return torch.from_numpy(np.ascontiguousarray(x)).float(), None if y is None else npz_labels(y, len(x), path, x_key, y_key, regression, strict)


def npz_labels(y: np.ndarray, n: int, path: str, x_key: str, y_key: str, regression: bool, strict: bool = True) -> list[str]:
    """One label per sample as strings; NaN or a missing-value string refused with its index (strict)."""
    if y.ndim != 1 or len(y) != n:
        raise UserError(f"{path}: '{y_key}' has shape {y.shape} but '{x_key}' has {n} samples (need one label per sample)")
    labels = [str(v) for v in y.tolist()]
    if strict:
        check_labels(labels, (f"'{y_key}'[{i}]" for i in range(n)), regression, path + ":")
    if np.issubdtype(y.dtype, np.floating) and not regression:
        finite = np.isfinite(y)
        if not np.all(np.mod(y[finite], 1) == 0):
            raise UserError(f"{path}: '{y_key}' holds non-integer numbers; class labels must be integers or strings (for regression set train.loss=mse or l1)")
        labels = [str(int(v)) if ok else s for v, ok, s in zip(y.tolist(), finite.tolist(), labels)]
    return labels


def build_npz(cfg) -> DataBundle:
    d = cfg.data
    regression = cfg.train.loss in REGRESSION_LOSSES
    x, labels = npz_arrays(d.path, d.x_key, d.y_key, regression=regression)
    if d.val_path:
        x_ev, lab_ev = npz_arrays(d.val_path, d.x_key, d.y_key, regression=regression)
        if x_ev.shape[1:] != x.shape[1:]:
            raise UserError(f"{d.val_path}: samples of shape {tuple(x_ev.shape[1:])}, but {d.path} has {tuple(x.shape[1:])}")
    x_tr, lab_tr, x_ev, lab_ev = train_eval(d, x, labels, (x_ev, lab_ev) if d.val_path else None)
    state = {"kind": "npz", "x_key": d.x_key, "y_key": d.y_key, "sample_shape": list(x.shape[1:])}
    return _bundle(x_tr, lab_tr, x_ev, lab_ev, cfg, state, d.path)
