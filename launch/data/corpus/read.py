"""Decoding rows: a physical unit at a time (a Parquet row group, an Arrow record batch, a JSONL
block), only the columns in use, through an LRU bounded in bytes. Counts what it decodes (the
bench's bytes per rank). File handles are opened per process (DataLoader workers are forked).
"""

from __future__ import annotations

import os
from collections import OrderedDict

from launch.data.corpus.files import need, nulls_in, open_arrow
from launch.errors import UserError


class LRU:
    """Least recently used entries, evicted beyond `limit` bytes (the newest entry always stays)."""

    def __init__(self, limit: int):
        self.limit, self.size, self.items = limit, 0, OrderedDict()

    def get(self, key):
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key, value, nbytes: int):
        self.items[key] = (value, nbytes)
        self.size += nbytes
        while self.size > self.limit and len(self.items) > 1:
            _, (_, n) = self.items.popitem(last=False)
            self.size -= n
        return value


class Reader:
    """Global rows [lo, hi) of a corpus as an Arrow table of `columns`."""

    def __init__(self, corpus, columns: list[str], cache_bytes: int):
        self.corpus, self.columns = corpus, list(columns)
        self.cache = LRU(cache_bytes)
        self.unit_bytes = corpus.column_bytes(self.columns)
        self.decoded_bytes = 0
        self.decoded_units = 0
        self.unknown_nulls = {c: {(name, u) for name, u, _ in _unknown(corpus, c)} for c in self.columns}
        self._pid, self._open = None, {}

    def __getstate__(self):
        return {**self.__dict__, "_pid": None, "_open": {}}

    def _source(self, f: int):
        """This process's handle on file f (a ParquetFile, or the memory-mapped Arrow batches)."""
        if self._pid != os.getpid():
            self._pid, self._open = os.getpid(), {}
        if f not in self._open:
            info = self.corpus.files[f]
            if self.corpus.fmt == "parquet":
                self._open[f] = need("pyarrow.parquet", "parquet").ParquetFile(info.path)
            elif self.corpus.fmt == "hf":
                self._open[f] = open_arrow(info.path)[1]
        return self._open.get(f)

    def physical(self, p: int):
        """Physical unit p's columns, decoded (or from the cache)."""
        hit = self.cache.get(("p", p))
        if hit is not None:
            return hit[0]
        phys, corpus = self.corpus.phys, self.corpus
        f, u = int(phys["file"][p]), int(phys["unit"][p])
        info = corpus.files[f]
        try:
            table = self._decode(f, u)
        except UserError:
            raise
        except Exception as e:  # a damaged page: pyarrow raises OSError, ArrowInvalid, ...
            raise UserError(f"corrupt {corpus.fmt} file {info.path} (unit {u}): {' '.join(str(e).split())[:200]}") from None
        if table.num_rows != info.units[u]:
            raise UserError(f"{info.path} unit {u}: {table.num_rows} rows where its metadata says {info.units[u]}: the file changed while in use")
        for c in self.columns:
            if (info.name, u) in self.unknown_nulls[c] and nulls_in(table.column(c)):
                raise UserError(f"{info.path} unit {u}: column '{c}' holds nulls (a value is missing)")
        self.decoded_bytes += int(self.unit_bytes[p])
        self.decoded_units += 1
        return self.cache.put(("p", p), table, table.nbytes)

    def _decode(self, f: int, u: int):
        pa = need("pyarrow", self.corpus.fmt)
        info, fmt = self.corpus.files[f], self.corpus.fmt
        if fmt == "parquet":
            return self._source(f).read_row_group(u, columns=self.columns)
        if fmt == "hf":
            return pa.Table.from_batches([self._source(f)[u].select(self.columns)])
        from launch.data.corpus.jsonl import BLOCK_LINES, parse, read_block

        end = info.offsets[u + 1] if u + 1 < len(info.offsets) else info.size
        table = parse(read_block(info.path, info.offsets[u], end), info.path, u * BLOCK_LINES + 1)
        schema = self.corpus.schema
        cols = []
        for c in self.columns:
            col = table.column(c) if c in table.column_names else pa.nulls(table.num_rows, schema.field(c).type)
            cols.append(col.cast(schema.field(c).type))
        return pa.table(cols, names=self.columns)

    def rows(self, lo: int, hi: int):
        """Global rows [lo, hi) as one table."""
        pa = need("pyarrow", self.corpus.fmt)
        parts = [self.physical(p).slice(a, b - a) for p, a, b in self.corpus.pieces(lo, hi)]
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)


def _unknown(corpus, column: str):
    """(file, unit) pairs whose metadata does not count nulls in `column`: checked when decoded."""
    return [(f, u, n) for f, u, n in corpus.nulls(column) if n < 0]
