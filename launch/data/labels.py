"""Targets of the tabular datasets (csv, npz): class names and indices, regression values, and the
checks that keep a missing or misread target from becoming data.

Class labels may be integers or strings: the sorted distinct labels of all files become class
indices. A missing label (an empty cell, `nan`, `None`, `NA`, ...) is refused with its file, line
and column (npz: its index), never turned into a class of its own: pandas writes NaN for an empty
cell, and a 0/1 column with one NaN would otherwise train a three-class model.
"""

from __future__ import annotations

import math

import torch

from launch.errors import UserError

REGRESSION_LOSSES = ("mse", "l1")

# What spreadsheets, pandas and R write for "no value" (compared case-insensitively).
MISSING = frozenset({"", "nan", "-nan", "+nan", "none", "null", "na", "n/a", "#n/a", "<na>", "nat"})


def is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def label_problem(value: str, regression: bool) -> str:
    """Why one raw target cannot be used ('' when it can): missing, or (regression) not a finite number."""
    if value.strip().lower() in MISSING:
        return "empty label" if value.strip() == "" else f"missing label {value!r}"
    if regression:
        try:
            ok = math.isfinite(float(value))
        except ValueError:
            ok = False
        if not ok:
            return f"target value {value!r} is not a finite number (train.loss is a regression loss)"
    return ""


def check_labels(labels: list[str], places, regression: bool, where: str) -> None:
    """Refuse the first unusable label; `places` says where each one is ('line 7, column 'y'')."""
    for v, place in zip(labels, places):
        problem = label_problem(v, regression)
        if problem:
            fix = "" if problem.startswith("target value") else ": fill it in or drop the row (a missing value is not a class)"
            raise UserError(f"{where} {place}: {problem}{fix}")


def class_names(labels: list[str]) -> list[str]:
    """Sorted distinct labels: numerically when they are all integers (so '10' follows '9')."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def encode(labels: list[str], names: list[str], where: str) -> torch.Tensor:
    index = {n: i for i, n in enumerate(names)}
    try:
        return torch.tensor([index[v] for v in labels], dtype=torch.long)
    except KeyError as e:
        raise UserError(f"{where}: label {e.args[0]!r} is not one of the model's classes ({', '.join(names[:10])})") from None


def regression_targets(labels: list[str], where: str) -> torch.Tensor:
    """Float targets [N, 1] for train.loss=mse/l1 (the readers have named any bad value's place already)."""
    check_labels(labels, (f"target {i}" for i in range(len(labels))), True, where)
    return torch.tensor([float(v) for v in labels], dtype=torch.float32)[:, None]


# A numeric target with more distinct values than MANY_CLASSES and fewer than ROWS_PER_CLASS rows per
# value on average is a measurement read as class labels (data/diabetes.csv without train.loss=mse:
# 214 "classes" in 442 rows), not a classification: refused unless data.many_classes confirms it.
MANY_CLASSES, ROWS_PER_CLASS = 20, 5


def check_many_classes(names: list[str], rows: int, confirmed: bool, where: str) -> None:
    k = len(names)
    if confirmed or k <= MANY_CLASSES or k * ROWS_PER_CLASS <= rows or not all(is_number(v) for v in names):
        return
    raise UserError(
        f"{where}: the target holds {k} distinct numbers in {rows} rows ({rows / k:.1f} rows per value), a measurement rather than class labels: "
        f"set train.loss=mse (or l1) for regression, or data.many_classes=true if these really are {k} classes")
