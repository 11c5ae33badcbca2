"""Text: data.text (a string column), data.tokenizer (a Hugging Face tokenizer directory) and
data.seq_len. A logical unit's documents are tokenized, each followed by the tokenizer's EOS, joined,
and cut into windows of seq_len + 1 tokens (nanoGPT's layout); the tokens after the unit's last whole
window are dropped (at most seq_len per unit; the share is said at start). A window's item is
(tokens[:-1], tokens[1:]): the next-token loss over every window token. Window i is the i-th window
of the split's units in order, whatever the world size or the workers.

How many windows a unit holds needs its tokens: the token counts are computed once (split over the
ranks) and cached with the index, keyed by the files' fingerprints, the column and the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from launch.data.corpus.files import need
from launch.data.corpus.index import shared
from launch.errors import UserError


def load_tokenizer(path: str):
    """A tokenizer saved with save_pretrained, from disk only; it must have an EOS token."""
    if not path:
        raise UserError("data.tokenizer: required with data.text (a Hugging Face tokenizer directory)")
    if not Path(path).is_dir():
        raise UserError(f"data.tokenizer={path}: not a directory (a tokenizer saved with save_pretrained)")
    transformers = need("transformers", "corpus")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # OSError, ValueError, ... from a partial or foreign directory
        raise UserError(f"data.tokenizer={path}: cannot load a tokenizer there ({' '.join(str(e).split())[:160]})") from None
    if tok.eos_token_id is None:
        raise UserError(f"data.tokenizer={path}: the tokenizer has no EOS token (documents are joined with it): set eos_token when saving it")
    return tok


TOKENIZER_FILES = ("token", "vocab", "merges", "special", "added", ".model")  # not a model's weights beside them


def fingerprint(path: str) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).iterdir()):
        if p.is_file() and any(t in p.name for t in TOKENIZER_FILES):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


class Text:
    """Makes a logical unit's documents into windows (int32 [n, seq_len + 1]) and batches of them."""

    def __init__(self, column: str, tokenizer_dir: str, seq_len: int):
        self.column, self.dir, self.seq_len = column, tokenizer_dir, seq_len
        self._tok = None
        tok = self.tokenizer()
        self.eos, self.vocab = int(tok.eos_token_id), len(tok)

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}

    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.dir)
        return self._tok

    @property
    def columns(self) -> list[str]:
        return [self.column]

    def tokens(self, table, where: str) -> np.ndarray:
        docs = table.column(self.column).to_pylist()
        if any(d is None for d in docs):
            raise UserError(f"{where}: text column '{self.column}' holds nulls")
        ids = self.tokenizer()(docs, add_special_tokens=False)["input_ids"] if docs else []
        out = np.empty(sum(len(i) + 1 for i in ids), dtype=np.int32)
        at = 0
        for doc in ids:
            out[at : at + len(doc)] = doc
            out[at + len(doc)] = self.eos
            at += len(doc) + 1
        return out

    def make(self, table, where: str) -> dict:
        toks = self.tokens(table, where)
        n = len(toks) // (self.seq_len + 1)
        return {"w": toks[: n * (self.seq_len + 1)].reshape(n, self.seq_len + 1)}

    @staticmethod
    def batch(arrays: dict, idx) -> tuple:
        w = arrays["w"].index_select(0, idx).long()
        return w[:, :-1], w[:, 1:]

    def sample_bytes(self) -> int:
        return 4 * (self.seq_len + 1)


def check_column(schema, column: str, where: str) -> None:
    if column not in schema.names:
        raise UserError(f"{where}: no column '{column}' for data.text (columns: {', '.join(schema.names[:12])})")
    t = str(schema.field(column).type)
    if t not in ("string", "large_string", "string_view"):
        raise UserError(f"{where}: data.text column '{column}' is {t}, not text")


def token_counts(corpus, reader, text: Text, index_dir) -> np.ndarray:
    """Tokens (EOS included) of each logical unit: cached, else counted once, split over the ranks."""
    key = [corpus.record()["fingerprint"], text.column, fingerprint(text.dir), corpus.unit_rows]
    name = hashlib.sha256(repr(key).encode()).hexdigest()[:20]
    path = Path(index_dir) / f"{name}.tokens.json" if index_dir else None
    if path is not None:
        try:
            body = json.loads(path.read_text())
            if body["key"] == key:
                return np.asarray(body["tokens"], dtype=np.int64)
        except (OSError, ValueError, KeyError):
            pass
    n = corpus.n_units
    chunks = [list(range(i, min(n, i + 16))) for i in range(0, n, 16)]

    def count(units):
        return [len(text.tokens(reader.rows(*corpus.unit_range(c)), f"{corpus.spec} unit {c}")) for c in units]

    tokens = np.asarray([t for part in shared(count, chunks) for t in part], dtype=np.int64)
    if path is not None:
        from launch.data.corpus.index import world

        if world()[0] == 0:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"key": key, "tokens": tokens.tolist()}))
                os.replace(tmp, path)
            except OSError:
                pass
    return tokens
