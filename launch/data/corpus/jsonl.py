"""JSONL: one JSON object per line. No metadata, so the index is built by reading each file once:
blocks of BLOCK_LINES lines (a block is a physical unit: its first byte, its rows, its nulls),
parsed with pyarrow's JSON reader (which also checks every line), and cached as a small JSON file
keyed by the file's path, size and modification time. A block is decoded later by reading its byte
range alone.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from launch.data.corpus.files import FileInfo, _digest, _ends, need, nulls_in
from launch.errors import UserError

BLOCK_LINES = 1024
CHUNK = 1 << 23  # bytes read at a time while indexing


def _line_starts(path: Path, size: int) -> np.ndarray:
    """Byte offset of every BLOCK_LINES-th line start (a bounded scan: the file is never held whole)."""
    starts, line, pos = [0], 0, 0
    with open(path, "rb") as f:
        while pos < size:
            chunk = f.read(CHUNK)
            ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + pos + 1
            first = (BLOCK_LINES - 1 - line) % BLOCK_LINES  # the line end that starts the next block
            starts.extend(ends[first::BLOCK_LINES].tolist() if first < len(ends) else [])
            line += len(ends)
            pos += len(chunk)
    if starts[-1] >= size:
        starts.pop()
    return np.asarray(starts, dtype=np.int64)


def parse(data: bytes, path, first_line: int):
    """One block's rows as an Arrow table; a bad line is one line naming the file and line."""
    pa, pj = need("pyarrow", "jsonl"), need("pyarrow.json", "jsonl")
    try:
        return pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(block_size=max(1 << 20, len(data) + 1)))
    except pa.ArrowInvalid as e:
        msg = " ".join(str(e).split())
        row = msg.rsplit("in row ", 1)
        where = f"line {first_line + int(row[1])}" if len(row) == 2 and row[1].isdigit() else f"lines {first_line}-{first_line + BLOCK_LINES - 1}"
        raise UserError(f"{path} {where}: not a JSON object per line ({msg.split(' in row ')[0][:120]})") from None


def read_block(path: str, start: int, end: int):
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def _cache_file(cache: Path, path: Path) -> Path:
    return cache / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:20]}.jsonl-index.json"


def _load(cache: Optional[Path], path: Path, size: int, mtime: int) -> Optional[dict]:
    if cache is None:
        return None
    try:
        body = json.loads(_cache_file(cache, path).read_text())
    except (OSError, ValueError):
        return None
    return body if body.get("key") == [str(path.resolve()), size, mtime, BLOCK_LINES] else None


def _save(cache: Optional[Path], path: Path, body: dict) -> None:
    """Best effort: an index that cannot be cached is rebuilt next time, nothing worse."""
    if cache is None:
        return
    try:
        cache.mkdir(parents=True, exist_ok=True)
        target = _cache_file(cache, path)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(body))
        os.replace(tmp, target)
    except OSError:
        pass


def scan_jsonl(path: Path, name: str, size: int, cache: Optional[Path]) -> FileInfo:
    pa = need("pyarrow", "jsonl")
    mtime = path.stat().st_mtime_ns
    body = _load(cache, path, size, mtime)
    if body is None:
        body = _index(path, size)
        body["key"] = [str(path.resolve()), size, mtime, BLOCK_LINES]
        _save(cache, path, body)
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(body["schema"]))) if body["schema"] else pa.schema([])
    return FileInfo(name, str(path), size, body["units"], schema, body["nulls"], {"*": body["bytes"]}, body["fingerprint"], body["offsets"])


def _index(path: Path, size: int) -> dict:
    """Read the file once: block offsets, rows, nulls and the schema its lines agree on."""
    starts = _line_starts(path, size) if size else np.zeros(0, dtype=np.int64)
    bounds = np.append(starts, size)
    units, offsets, nbytes, per_block, schema = [], [], [], [], None
    for b, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        table = parse(read_block(str(path), lo, hi), path, b * BLOCK_LINES + 1)
        if table.num_rows == 0:
            continue
        schema = widen(schema, table.schema, path, b * BLOCK_LINES + 1)
        per_block.append({c: nulls_in(table.column(c)) for c in table.column_names})
        units.append(table.num_rows)
        offsets.append(lo)
        nbytes.append(hi - lo)
    # a key missing from a block's lines counts as nulls there
    nulls = {c: [blk.get(c, rows) for blk, rows in zip(per_block, units)] for c in (schema.names if schema is not None else [])}
    blob = base64.b64encode(schema.serialize().to_pybytes()).decode() if schema is not None else ""
    return {"units": units, "offsets": offsets, "bytes": nbytes, "nulls": nulls, "schema": blob,
            "fingerprint": _digest(size, units, blob, _ends(path, size))}


def widen(schema, new, path, line: int):
    """The schema all blocks so far agree on: integers widen to floats; any other difference is one line."""
    pa = need("pyarrow", "jsonl")
    if schema is None:
        return new
    fields = {f.name: f.type for f in schema}
    for f in new:
        old = fields.get(f.name)
        if old is None or old == f.type or pa.types.is_null(f.type):
            fields[f.name] = old or f.type
        elif pa.types.is_null(old):
            fields[f.name] = f.type
        elif pa.types.is_integer(old) and pa.types.is_floating(f.type) or pa.types.is_floating(old) and pa.types.is_integer(f.type):
            fields[f.name] = pa.float64()
        else:
            raise UserError(f"{path} from line {line}: column '{f.name}' holds {f.type}, earlier lines hold {old}")
    return pa.schema([pa.field(n, t) for n, t in fields.items()])
