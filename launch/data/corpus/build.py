"""data.name=parquet | jsonl | hf: the corpus's index, its columns checked, its splits and their state."""

from __future__ import annotations

import os

import numpy as np

import launch.data.corpus.rows as rows_mod
import launch.data.corpus.text as text_mod
from launch.data.corpus.files import need
from launch.data.corpus.index import Corpus, cache_dir, say, world
from launch.data.corpus.order import auto_window
from launch.data.corpus.read import Reader
from launch.data.corpus.split import CorpusSplit, Units
from launch.data.types import DataBundle, Split
from launch.errors import UserError


def build(cfg, fmt: str) -> DataBundle:
    d = cfg.data
    need("pyarrow", fmt)
    train = Corpus(fmt, d.path, "data.path", d.unit_rows, d.index_dir)
    val = Corpus(fmt, d.val_path, "data.val_path", d.unit_rows, d.index_dir) if d.val_path else None
    for c in filter(None, (train, val)):
        if c.skipped:
            say(f"data: skipped {len(c.skipped)} empty file(s) of {c.what}: {', '.join(c.skipped[:5])}{' ...' if len(c.skipped) > 5 else ''}")
    cache = d.cache_mb << 19  # half of data.cache_mb for decoded units, half for their samples
    if d.text:
        maker, state = _text_maker(d, train, val)
    else:
        maker, state = _rows_maker(cfg, train, val, cache)
    units, samples, held = _samples(train, maker, cache, d)
    source = Units(train, Reader(train, maker.columns, cache), maker, cache)
    if val is not None:
        v_units, v_samples, _ = _samples(val, maker, cache, d)
        v_source = Units(val, Reader(val, maker.columns, cache), maker, cache)
        tr, ev = CorpusSplit(source, units, samples, "training"), CorpusSplit(v_source, v_units, v_samples, "evaluation")
    else:
        keep = np.ones(len(units), dtype=bool)
        keep[held] = False
        tr = CorpusSplit(source, units[keep], samples[keep], "training")
        ev = CorpusSplit(source, units[~keep], samples[~keep], "evaluation")
    if d.standardize and not d.text:
        raw = Units(train, Reader(train, maker.columns, cache), maker, cache)
        maker.state.update(rows_mod.standardisation(raw, tr.units.tolist()))
        state.update(mean=maker.state["mean"], std=maker.state["std"], standardisation_rows=maker.state["estimated_from_rows"])
    record = {"train": train.record(), "eval": val.record() if val is not None else {}}
    tr.record = ev.record = record
    if len(tr) == 0 or len(ev) == 0:
        which = "training" if len(tr) == 0 else "evaluation"
        raise UserError(f"data.name={fmt}: the {which} split holds no sample" + (f" (no unit holds a window of data.seq_len={d.seq_len} + 1 tokens)" if d.text else ""))
    _describe(cfg, fmt, train, tr, ev, maker, val is None)
    state.update(kind=fmt, fingerprint=record["train"]["fingerprint"], unit_rows=train.unit_rows)
    if d.num_workers and d.text:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers tokenize; the main process's threads would be lost anyway
    in_features = d.seq_len if d.text else int(sum(maker.widths.get(f, 1) for f in maker.features))
    return DataBundle(Split(dataset=tr), Split(dataset=ev), in_features, _outputs(cfg, maker), state)


def _text_maker(d, train, val):
    for c in filter(None, (train, val)):
        text_mod.check_column(c.schema, d.text, c.spec)
        _no_nulls(c, d.text)
    maker = text_mod.Text(d.text, d.tokenizer, d.seq_len)
    state = {"text": d.text, "tokenizer": os.path.abspath(d.tokenizer), "tokenizer_fingerprint": text_mod.fingerprint(d.tokenizer),
             "seq_len": d.seq_len, "eos_token_id": maker.eos, "vocab_size": maker.vocab}
    return maker, state


def _rows_maker(cfg, train, val, cache):
    d = cfg.data
    features, target = rows_mod.columns(train.schema, d, train.spec)
    if val is not None:
        for col in (*features, target):
            if col not in val.schema.names:
                raise UserError(f"{val.spec}: no column '{col}' (data.val_path needs the columns of data.path)")
            if val.schema.field(col).type != train.schema.field(col).type:
                raise UserError(f"{val.spec}: column '{col}' is {val.schema.field(col).type}, data.path has {train.schema.field(col).type}")
    for c in filter(None, (train, val)):
        for col in (*features, target):
            _no_nulls(c, col)
    kind, names = rows_mod.target_kind(train, Reader(train, [target], cache), target, cfg.train.loss, d.many_classes)
    first = Reader(train, [*features, target], cache).physical(0).slice(0, 1)
    widths = {col: rows_mod.to_matrix(first.column(col), train.spec, col).shape[1] for col in (*features, target)}
    maker = rows_mod.Tabular(features, target, kind, names, widths, binary=cfg.train.loss == "bce_with_logits")
    state = {"feature_columns": features, "target": target, "feature_widths": [widths[f] for f in features]}
    if names:
        state["class_names"] = names
    return maker, state


def _no_nulls(corpus, column: str) -> None:
    """Nulls the metadata counts are refused now; units whose metadata does not say are checked when decoded."""
    for name, unit, n in corpus.nulls(column):
        if n > 0:
            raise UserError(f"{corpus.spec}: {name} unit {unit}: column '{column}' holds {n} null(s) (a missing value)")


def _samples(corpus, maker, cache, d) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logical units, samples in each, the units held out for evaluation when there is no data.val_path)."""
    units = np.arange(corpus.n_units, dtype=np.int64)
    if d.text:
        tokens = text_mod.token_counts(corpus, Reader(corpus, maker.columns, cache), maker, cache_dir(d.index_dir, corpus_base(corpus)))
        samples = tokens // (d.seq_len + 1)
        corpus.tokens = int(tokens.sum())
    else:
        samples = np.asarray([hi - lo for lo, hi in map(corpus.unit_range, range(corpus.n_units))], dtype=np.int64)
    held = np.zeros(0, dtype=np.int64)
    if not d.val_path:
        if corpus.n_units < 2:
            raise UserError(f"data.path holds a single unit of {corpus.rows} rows: give data.val_path, or a data.unit_rows below that so part of it can be held out")
        n_val = min(corpus.n_units - 1, max(1, round(corpus.n_units * d.val_fraction)))
        held = np.sort(np.random.default_rng(d.seed).permutation(corpus.n_units)[:n_val])
    return units, samples, held


def corpus_base(corpus):
    from pathlib import Path

    return Path(corpus.files[0].path).parent


def _outputs(cfg, maker):
    if cfg.data.text:
        return None
    if maker.names and not maker.binary:
        return len(maker.names)
    return int(maker.widths.get(maker.target, 1))


def _describe(cfg, fmt, corpus, tr, ev, maker, held) -> None:
    d = cfg.data
    _, k = world()
    micro = d.batch_size * k
    window = max(micro, (d.shuffle_window // micro) * micro) if d.shuffle_window else auto_window(tr.samples, maker.sample_bytes(), micro)
    tr.window = window
    what = "windows" if d.text else "rows"
    mean_unit = float(np.mean(tr.samples)) if len(tr.samples) else 0.0
    line = (f"data: {fmt} corpus {d.path}: {len(corpus.files)} file(s), {corpus.rows:,} rows in {corpus.describe_units()}; "
            f"training {len(tr):,} {what}, evaluation {len(ev):,}{' (held-out units)' if held else ''}")
    if d.text:
        kept = len(tr) * (d.seq_len + 1) + (len(ev) * (d.seq_len + 1) if held else 0)
        line += f"; {getattr(corpus, 'tokens', 0):,} tokens, {1 - kept / max(1, corpus.tokens):.1%} dropped at unit ends"
    say(line)
    say(f"data: order: blocks of {window:,} {what} ({window // micro} micro-batches of {micro}), each mixing ~{window / max(mean_unit, 1):.0f} units; "
        f"a rank decodes ~{1 + k * mean_unit / window:.2f}x its 1/{k} share")
