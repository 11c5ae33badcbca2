"""Reading rows of records: JSONL, JSON (a list of rows) or Parquet files, a path or a glob, each row
with where it came from (file:line, or file row N) so that a bad one is named in one line.

Fine-tuning rows (launch.data.sft) are checked here, before anything is tokenized: a row is
{"prompt", "response"} (strings, the response not empty; "system" optional) or {"messages": [{"role",
"content"}, ...]} with at least one non-empty assistant message.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

from launch.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet")


def files_of(pattern: str, key: str) -> list[Path]:
    if glob.has_magic(pattern):
        found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not found:
            raise UserError(f"{key}={pattern}: matches no file")
    else:
        if not Path(pattern).is_file():
            raise UserError(f"{key}={pattern}: no such file")
        found = [Path(pattern)]
    odd = [f for f in found if f.suffix.lower() not in SUFFIXES]
    if odd:
        raise UserError(f"{key}: {odd[0]} is not a .jsonl, .json or .parquet file")
    return found


def _records(path: Path):
    """(record, where) of one file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line), f"{path}:{n}"
                    except ValueError as e:
                        raise UserError(f"{path}:{n}: not a JSON object ({getattr(e, 'msg', e)})") from None
    elif suffix == ".json":
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"{path}: not JSON ({getattr(e, 'msg', e)} at line {getattr(e, 'lineno', '?')})") from None
        if not isinstance(body, list):
            raise UserError(f"{path}: a JSON file of rows holds a list of objects, got a {type(body).__name__}")
        yield from ((r, f"{path} row {i + 1}") for i, r in enumerate(body))
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # ArrowInvalid and friends
            raise UserError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())[:120]})") from None
        yield from ((r, f"{path} row {i + 1}") for i, r in enumerate(table.to_pylist()))


def check_row(row, at: str) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{at}: a row is an object with 'prompt' and 'response', or 'messages'; got a {type(row).__name__}")
    if row.get("messages") is not None:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
            raise UserError(f"{at}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} with string values")
        answers = [m for m in msgs if m["role"] == "assistant"]
        if not answers:
            raise UserError(f"{at}: no assistant message, nothing to learn from")
        if any(not m["content"].strip() for m in answers):
            raise UserError(f"{at}: an empty assistant message")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    if "prompt" not in row or "response" not in row:
        raise UserError(f"{at}: a row needs 'prompt' and 'response', or 'messages' (it has {', '.join(map(str, row)) or 'no keys'})")
    for key in ("prompt", "response", *(("system",) if row.get("system") is not None else ())):
        if not isinstance(row[key], str):
            raise UserError(f"{at}: '{key}' must be a string, got {type(row[key]).__name__}")
    if not row["response"].strip():
        raise UserError(f"{at}: empty response")
    return {k: row[k] for k in ("system", "prompt", "response") if row.get(k) is not None}


def read_rows(pattern: str, key: str) -> list[tuple[dict, str]]:
    """Every row of every file the pattern names, checked, in file order."""
    rows = [(check_row(r, at), at) for f in files_of(pattern, key) for r, at in _records(f)]
    if not rows:
        raise UserError(f"{key}={pattern}: no rows in it")
    return rows
