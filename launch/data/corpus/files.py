"""A corpus's files and what their metadata says, without reading their rows.

`find` turns data.path (a file, a directory or a glob) into a sorted file list. `scan` reads one
file's metadata: its physical units (Parquet row groups, Arrow record batches, JSONL blocks of
lines), rows, schema, null counts and bytes per column and unit, and a fingerprint. Parquet comes
from the footer; Arrow from the record batch headers of the memory-mapped file (no data page is
touched); JSONL has no metadata, so its index is built once by reading it (launch.data.corpus.jsonl)
and cached.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from launch.errors import UserError

EXTENSIONS = {"parquet": (".parquet", ".pq"), "jsonl": (".jsonl", ".json", ".ndjson"), "hf": (".arrow",)}
INDEX_DIR = ".launch-index"  # our caches beside the data; never part of the corpus


def need(module: str, fmt: str):
    """An optional dependency, or one line naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"data.name={fmt} needs the '{module.split('.')[0]}' package: pip install 'launch-trainer[corpus]'") from None


@dataclass
class FileInfo:
    """One file of a corpus as its metadata describes it (plain, picklable: ranks trade these)."""

    name: str  # relative to the corpus's base directory: what the checkpoint records
    path: str
    size: int
    units: list  # rows per physical unit, in file order
    schema: Any  # pyarrow.Schema
    nulls: dict  # column -> [nulls per unit, or -1 where the file does not say]
    col_bytes: dict  # column -> [bytes per unit] (compressed for Parquet; JSONL: one entry '*')
    fingerprint: str
    offsets: list = field(default_factory=list)  # JSONL: each unit's first byte

    @property
    def rows(self) -> int:
        return int(sum(self.units))


def find(spec: str, fmt: str, what: str = "data.path") -> tuple[Path, list[Path]]:
    """(base directory, sorted files) for a file, a directory or a glob; one line when none is there."""
    if any(c in spec for c in "*?["):
        hits = [Path(p) for p in globlib.glob(spec, recursive=True) if Path(p).is_file()]
        base = Path(spec.split("*")[0].split("?")[0].split("[")[0] or ".")
        base = base if base.is_dir() else base.parent
    elif Path(spec).is_dir():
        base = Path(spec)
        hits = _in_directory(base, fmt)
    elif Path(spec).is_file():
        base, hits = Path(spec).parent, [Path(spec)]
    else:
        raise UserError(f"{what}={spec}: no such file or directory")
    hits = sorted(p for p in hits if INDEX_DIR not in p.parts)
    if not hits:
        raise UserError(f"{what}={spec}: no {' or '.join(EXTENSIONS[fmt])} files there")
    for p in hits:
        if p.suffix == ".gz":
            raise UserError(f"{p}: compressed JSONL cannot be read by row ranges; decompress it (or convert to Parquet)")
    return base, hits


def _in_directory(base: Path, fmt: str) -> list[Path]:
    if fmt == "hf":
        if (base / "dataset_dict.json").is_file():
            splits = ", ".join(sorted(p.name for p in base.iterdir() if p.is_dir()))
            raise UserError(f"{base} is a DatasetDict: point data.path (and data.val_path) at one split's directory ({splits})")
        state = base / "state.json"
        if state.is_file():  # datasets.save_to_disk: its own file order
            try:
                return [base / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{state}: not the state.json that datasets.save_to_disk writes") from None
    return [p for p in base.rglob("*") if p.is_file() and p.name.endswith(EXTENSIONS[fmt])]


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return h.hexdigest()[:16]


def _ends(path: Path, size: int, n: int = 1 << 16) -> bytes:
    """The first and last n bytes of a file: part of its fingerprint."""
    with open(path, "rb") as f:
        head = f.read(n)
        f.seek(max(0, size - n))
        return head + f.read(n)


def _footer(path: Path, size: int) -> bytes:
    """A Parquet file's serialized footer (its row groups' statistics included): metadata, not rows."""
    with open(path, "rb") as f:
        f.seek(size - 8)
        n = int.from_bytes(f.read(4), "little")
        f.seek(max(0, size - 8 - n))
        return f.read(n)


def relative_name(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def scan(path: Path, base: Path, fmt: str) -> FileInfo:
    """One Parquet or Arrow file's FileInfo; a corrupt or unreadable file is one line naming it."""
    size = path.stat().st_size
    return (_parquet if fmt == "parquet" else _arrow)(path, relative_name(path, base), size)


def _parquet(path: Path, name: str, size: int) -> FileInfo:
    pq = need("pyarrow.parquet", "parquet")
    try:
        f = pq.ParquetFile(path)
        md, schema = f.metadata, f.schema_arrow
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged footer
        raise UserError(f"corrupt Parquet file {path}: {' '.join(str(e).split())[:200]}") from None
    cols = schema.names
    nulls = {c: [0] * md.num_row_groups for c in cols}
    nbytes = {c: [0] * md.num_row_groups for c in cols}
    units = []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        units.append(rg.num_rows)
        for j in range(rg.num_columns):
            cc = rg.column(j)
            top = cc.path_in_schema.split(".")[0]
            if top not in nulls:
                continue
            nbytes[top][g] += cc.total_compressed_size
            st = cc.statistics
            if st is None or not st.has_null_count:
                nulls[top][g] = -1
            elif nulls[top][g] >= 0:
                nulls[top][g] += st.null_count
    fp = _digest(size, units, str(schema), _footer(path, size))
    return FileInfo(name, str(path), size, units, schema, nulls, nbytes, fp)


def open_arrow(path: str):
    """The record batches of an Arrow file (IPC file or stream format, as datasets writes it), memory-mapped."""
    pa = need("pyarrow", "hf")
    source = pa.memory_map(str(path), "r")
    try:
        reader = pa.ipc.open_file(source)
        return reader.schema, [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_stream(source)
        return reader.schema, list(reader)


def nulls_in(array) -> int:
    """Nulls in an Arrow array, counting inside lists (a feature vector with a hole is as bad as a missing one)."""
    count = array.null_count
    if hasattr(array.type, "value_type"):
        count += nulls_in(need("pyarrow.compute", "corpus").list_flatten(array))
    return int(count)


def _arrow(path: Path, name: str, size: int) -> FileInfo:
    pa = need("pyarrow", "hf")
    try:
        schema, batches = open_arrow(str(path))
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"corrupt Arrow file {path}: {' '.join(str(e).split())[:200]}") from None
    cols = schema.names
    units = [b.num_rows for b in batches]
    nulls = {c: [nulls_in(b.column(i)) for b in batches] for i, c in enumerate(cols)}
    nbytes = {c: [int(b.column(i).nbytes) for b in batches] for i, c in enumerate(cols)}
    fp = _digest(size, units, str(schema), _ends(path, size))
    return FileInfo(name, str(path), size, units, schema, nulls, nbytes, fp)


def unit_table(infos: list[FileInfo]) -> dict:
    """Every physical unit of the corpus in order: file index, unit within file, first global row, rows."""
    file_of, unit_of, rows = [], [], []
    for i, info in enumerate(infos):
        for u, n in enumerate(info.units):
            file_of.append(i)
            unit_of.append(u)
            rows.append(n)
    rows = np.asarray(rows, dtype=np.int64)
    return {"file": np.asarray(file_of, dtype=np.int64), "unit": np.asarray(unit_of, dtype=np.int64),
            "rows": rows, "start": np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)}
