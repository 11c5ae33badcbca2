"""The global index of a corpus: every row addressed as (file, physical unit, row), built from metadata.

The files of a split are read in sorted order; their rows, concatenated, are numbered 0..R-1. The
order's unit (a *logical* unit) is a run of data.unit_rows consecutive rows of that numbering
(0, the default: a logical unit is a physical one, a row group / record batch / JSONL block). Logical units do not depend on how the rows are cut into files or row groups: the
same rows with the same data.unit_rows are the same units in any format.

Building the index is split over the ranks (rank r scans files r, r+k, ...; the results are traded
in one all_gather), so a rank reads 1/k of the footers (and of the JSONL bytes, the first time).
A file that fails is the same one line on every rank.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

import launch.data.corpus.files as files_mod
from launch.errors import UserError


def world() -> tuple[int, int]:
    """(rank, world size) of the process group if there is one, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def say(msg: str) -> None:
    if world()[0] == 0:
        print(msg, flush=True)


def shared(fn: Callable, items: list) -> list:
    """[fn(item) for item in items], each computed on one rank (item i on rank i % k) and traded.
    A UserError on any rank is raised on every rank (the first in item order), so they stop alike."""
    rank, k = world()
    mine = {}
    for i in range(rank, len(items), k):
        try:
            mine[i] = ("ok", fn(items[i]))
        except UserError as e:
            mine[i] = ("error", str(e))
    parts = [mine]
    if k > 1:
        import torch.distributed as dist

        parts = [None] * k
        dist.all_gather_object(parts, mine)
    merged = {i: v for part in parts for i, v in part.items()}
    for i in range(len(items)):
        kind, value = merged[i]
        if kind == "error":
            raise UserError(value)
    return [merged[i][1] for i in range(len(items))]


def cache_dir(index_dir: str, base: Path) -> Path | None:
    """data.index_dir, else a hidden directory beside the data if it may be written, else the user's cache."""
    if index_dir:
        return Path(index_dir)
    if os.access(base, os.W_OK):
        return base / files_mod.INDEX_DIR
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(home) / "launch" / "corpus-index"


class Corpus:
    """One split's files (empty ones left out), their physical units and the logical units over them."""

    def __init__(self, fmt: str, spec: str, what: str, unit_rows: int, index_dir: str):
        self.fmt, self.spec, self.what = fmt, spec, what
        base, paths = files_mod.find(spec, fmt, what)
        if fmt == "jsonl":
            from launch.data.corpus.jsonl import scan_jsonl

            cache = cache_dir(index_dir, base)
            infos = shared(lambda p: scan_jsonl(p, files_mod.relative_name(p, base), p.stat().st_size, cache), paths)
        else:
            infos = shared(lambda p: files_mod.scan(p, base, fmt), paths)
        self.skipped = [i.name for i in infos if i.rows == 0]
        self.files = [i for i in infos if i.rows > 0]
        if not self.files:
            raise UserError(f"{what}={spec}: every file is empty ({len(infos)} files, 0 rows)")
        self.schema = common_schema(self.files, fmt)
        self.phys = files_mod.unit_table(self.files)
        self.rows = int(self.phys["start"][-1])
        self.unit_rows = unit_rows  # 0: a logical unit is a physical one
        self.bounds = self.phys["start"] if not unit_rows else np.append(np.arange(0, self.rows, unit_rows, dtype=np.int64), self.rows)
        self.n_units = len(self.bounds) - 1

    def unit_range(self, c: int) -> tuple[int, int]:
        """Global rows [lo, hi) of logical unit c."""
        return int(self.bounds[c]), int(self.bounds[c + 1])

    def describe_units(self) -> str:
        if self.unit_rows:
            return f"{self.n_units:,} units of {self.unit_rows:,} rows"
        kind = {"parquet": "row groups", "hf": "record batches", "jsonl": "blocks of lines"}[self.fmt]
        return f"{self.n_units:,} units ({kind}, {self.rows / max(1, self.n_units):,.0f} rows on average)"

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """The physical units holding global rows [lo, hi): (physical unit, first row in it, end row in it)."""
        start = self.phys["start"]
        out = []
        p = int(np.searchsorted(start, lo, side="right")) - 1
        while lo < hi:
            end = min(hi, int(start[p + 1]))
            out.append((p, lo - int(start[p]), end - int(start[p])))
            lo, p = end, p + 1
        return out

    def nulls(self, column: str) -> list[tuple[str, int, int]]:
        """(file, physical unit, nulls) where the metadata counts nulls in `column` (-1: not recorded)."""
        return [(f.name, u, n) for f in self.files for u, n in enumerate(f.nulls.get(column, [])) if n]

    def column_bytes(self, columns: list[str]) -> np.ndarray:
        """Bytes of `columns` per physical unit (what decoding that unit reads)."""
        keys = ["*"] if self.fmt == "jsonl" else columns
        return np.asarray([sum(f.col_bytes[c][u] for c in keys) for f in self.files for u in range(len(f.units))], dtype=np.int64)

    def record(self) -> dict:
        """What a checkpoint keeps of this split: file names, sizes, rows and fingerprints."""
        listed = [[f.name, f.size, f.rows, f.fingerprint] for f in self.files]
        digest = hashlib.sha256(repr(listed).encode()).hexdigest()[:16]
        return {"format": self.fmt, "files": listed, "fingerprint": digest, "unit_rows": self.unit_rows}


def common_schema(infos: list, fmt: str):
    """The one schema every file shares; a difference is one line naming both files and the column."""
    first = infos[0]
    want = {f.name: f.type for f in first.schema}
    if fmt == "jsonl":  # JSON numbers: integers in one file and floats in another are one float column
        from launch.data.corpus.jsonl import widen

        schema = first.schema
        for info in infos[1:]:
            schema = widen(schema, info.schema, info.name, 1)
            if set(info.schema.names) != set(first.schema.names):
                _differ(first, info)
        return schema
    for info in infos[1:]:
        have = {f.name: f.type for f in info.schema}
        if have != want:
            _differ(first, info)
    return first.schema


def _differ(first, info) -> None:
    want = {f.name: f.type for f in first.schema}
    have = {f.name: f.type for f in info.schema}
    for name in want:
        if name not in have:
            raise UserError(f"{info.path}: no column '{name}' ({first.path} has it): the shards' schemas differ")
        if have[name] != want[name]:
            raise UserError(f"{info.path}: column '{name}' is {have[name]}, {first.path} has {want[name]}: the shards' schemas differ")
    extra = next(n for n in have if n not in want)
    raise UserError(f"{info.path}: column '{extra}' is not in {first.path}: the shards' schemas differ")


def changes(old: dict, new: dict) -> list[str]:
    """What differs between two records of a split: files added, removed or changed."""
    before = {f[0]: f[1:] for f in old.get("files", [])}
    after = {f[0]: f[1:] for f in new.get("files", [])}
    out = [f"{n} added" for n in after if n not in before] + [f"{n} removed" for n in before if n not in after]
    for n in after:
        if n in before and after[n] != before[n]:
            (s0, r0, _), (s1, r1, _) = before[n], after[n]
            out.append(f"{n} changed ({s0} -> {s1} bytes, {r0} -> {r1} rows)" if (s0, r0) != (s1, r1) else f"{n} changed (same size and rows, other content)")
    if not out and old.get("unit_rows") != new.get("unit_rows"):
        out.append(f"units of {old.get('unit_rows')} -> {new.get('unit_rows')} rows")
    return out
