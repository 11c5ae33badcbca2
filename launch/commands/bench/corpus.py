"""The bench's corpus section: reading a Parquet corpus larger than the page cache's comfort, per rank.

A tabular corpus is generated into a temporary directory (removed afterwards): 64 shards of uneven
sizes (about 2.1 GB, 10.5M rows of 48 float32 features and an int64 label, row groups of 16,384 rows;
--quick: 200k rows). For 1, 2 and 3 ranks, k processes read one epoch of their shares at once, at the
same global batch (240), each printing rows, seconds, bytes read and peak RSS
(launch.commands.bench.corpus_probes): ours (data.name=parquet) on the whole corpus, then side by side
on its first 4 shards ours, Hugging Face `datasets` streaming with split_dataset_by_node, and MosaicML
`streaming` on the same rows written as MDS, each where installed ("not installed" recorded
otherwise; LAUNCH_BENCH_STREAMING_PYTHON names an interpreter that has mosaicml-streaming). Our peak
RSS on 16 shards against all 64 shows it bounded. Also: the index's build time and size for the 10.5M
rows (Parquet footers) and for 10M JSONL rows (a full read, once), and the order's shuffle statistics.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import launch.commands.bench.corpus_probes as probes

WIDTH, ROW_GROUP, SHARDS, GLOBAL_BATCH = 48, 16384, 64, 240
ROOT = Path(__file__).resolve().parents[3]


def generate(root: Path, rows: int, shards: int, row_group: int, seed: int = 0) -> dict:
    """Shards of uneven sizes (0.6x to 1.4x the mean), a learnable label; a small evaluation shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.6, 1.4, size=shards)
    sizes = np.floor(weights / weights.sum() * rows).astype(int)
    sizes[-1] += rows - sizes.sum()
    w = rng.normal(size=WIDTH).astype(np.float32)
    for split, counts in (("train", sizes), ("val", [max(1000, rows // 1000)])):
        (root / split).mkdir(parents=True)
        for i, n in enumerate(counts):
            x = rng.normal(size=(int(n), WIDTH)).astype(np.float32)
            label = (x @ w > 0).astype(np.int64)
            col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), WIDTH)
            pq.write_table(pa.table({"x": col, "label": label}), root / split / f"part-{i:03d}.parquet", row_group_size=row_group, compression="snappy")
    files = sorted((root / "train").glob("*.parquet"))
    return {"rows": int(sizes.sum()), "files": len(files), "bytes": sum(f.stat().st_size for f in files), "row_group_rows": row_group}


def _ranks(script: str, args: list[dict], python: str = sys.executable, timeout: float = 3600) -> list[dict]:
    """Run k copies of a probe at once; their reports, or {'error': ...} for one that failed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([python, "-c", script, json.dumps(a)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for a in args]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        out.append(json.loads(lines[-1]) if p.returncode == 0 and lines else {"error": (stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:300]})
    return out


def _summary(reports: list[dict], corpus_bytes: int, k: int) -> dict:
    if any("error" in r for r in reports):
        return {"error": next(r["error"] for r in reports if "error" in r)}
    rows = sum(r["rows"] for r in reports)
    slowest = max(r["seconds"] for r in reports)
    out = {"ranks": k, "rows": rows, "seconds": round(slowest, 2), "rows_per_s": round(rows / slowest), "per_rank": reports,
           "read_vs_share": round(max(r["read_bytes"] for r in reports) / (corpus_bytes / k), 3),
           "peak_rss_mb": round(max(r["peak_rss_mb"] for r in reports))}
    if all("decoded_bytes" in r for r in reports):
        out["decoded_vs_share"] = round(max(r["decoded_bytes"] for r in reports) / (corpus_bytes / k), 3)
    return out


def _streaming_python():
    named = os.environ.get("LAUNCH_BENCH_STREAMING_PYTHON")
    if named:
        return named
    return sys.executable if importlib.util.find_spec("streaming") else None


def _runs(script: str, common: dict, corpus_bytes: int, python: str = sys.executable) -> list[dict]:
    from launch.processes.dist import free_port

    out = []
    for k in (1, 2, 3):
        port = free_port()
        out.append(_summary(_ranks(script, [{**common, "rank": r, "k": k, "batch": GLOBAL_BATCH // k, "port": port} for r in range(k)], python), corpus_bytes, k))
    return out


def side_by_side(root: Path, files: int, window: int, say, with_peers: bool) -> dict:
    """Ours, Hugging Face datasets and MosaicML streaming on the same first `files` shards (the peers
    yield one sample at a time in Python: the whole corpus would take them about an hour here)."""
    sub = root / "subset"
    sub.mkdir()
    for f in sorted((root / "train").glob("*.parquet"))[:files]:
        os.symlink(f, sub / f.name)
    nbytes = sum(f.stat().st_size for f in sub.glob("*.parquet"))
    common = {"path": str(sub), "val": str(root / "val"), "window": window, "mds": str(root / "mds")}
    res = {"files": files, "bytes": nbytes}
    say(f"corpus: side by side on {files} shards: ours")
    res["ours"] = _runs(probes.OURS, common, nbytes)
    res["rows"] = res["ours"][0].get("rows")
    if not with_peers or not importlib.util.find_spec("datasets"):
        res["hf_datasets"] = "not installed" if with_peers else "not run"
    else:
        say("corpus: side by side: Hugging Face datasets (streaming, split_dataset_by_node)")
        res["hf_datasets"] = _runs(probes.HF, common, nbytes)
    mosaic_py = _streaming_python() if with_peers else None
    if not mosaic_py:
        res["mosaicml_streaming"] = "not installed (or set LAUNCH_BENCH_STREAMING_PYTHON)" if with_peers else "not run"
    else:
        say("corpus: side by side: MosaicML streaming (writing the rows as MDS first)")
        res["mds_write_s"] = _ranks(probes.MOSAIC_WRITE, [{**common, "rank": 0, "k": 1, "batch": 0}], mosaic_py)[0].get("seconds")
        res["mosaicml_streaming"] = _runs(probes.MOSAIC, common, nbytes, mosaic_py)
    return res


def index_cost(root: Path, rows: int) -> dict:
    """Build the index of the Parquet corpus (footers only) and of a JSONL corpus of `rows` rows (read once)."""
    import pandas as pd

    from launch.data.corpus.index import Corpus

    out = {}
    t0 = time.perf_counter()
    c = Corpus("parquet", str(root / "train"), "data.path", 0, "")
    out["parquet"] = {"rows": c.rows, "files": len(c.files), "units": c.n_units, "seconds": round(time.perf_counter() - t0, 3),
                      "index_bytes": len(pickle.dumps(c.files))}
    jdir = root / "jsonl"
    jdir.mkdir()
    rng = np.random.default_rng(1)
    per = rows // 8
    for i in range(8):
        pd.DataFrame({"a": rng.normal(size=per).round(6), "label": rng.integers(0, 2, size=per)}).to_json(jdir / f"part-{i}.jsonl", orient="records", lines=True)
    t0 = time.perf_counter()
    c = Corpus("jsonl", str(jdir), "data.path", 0, str(root / "index"))
    cached = sum(f.stat().st_size for f in (root / "index").glob("*"))
    out["jsonl"] = {"rows": c.rows, "files": len(c.files), "units": c.n_units, "seconds": round(time.perf_counter() - t0, 2),
                    "bytes": sum(f.stat().st_size for f in jdir.glob("*.jsonl")), "index_bytes": cached}
    t0 = time.perf_counter()
    Corpus("jsonl", str(jdir), "data.path", 0, str(root / "index"))
    out["jsonl"]["cached_seconds"] = round(time.perf_counter() - t0, 3)
    return out


def shuffle_quality(root: Path, window: int) -> dict:
    """Units per micro-batch and the units consecutive micro-batches share, ours against a full shuffle."""
    from launch.data.corpus.index import Corpus
    from launch.data.corpus.order import EpochOrder, shuffle_stats

    c = Corpus("parquet", str(root / "train"), "data.path", 0, "")
    sizes = np.diff(c.bounds)
    ours = shuffle_stats(EpochOrder(sizes, 0, 0, GLOBAL_BATCH, window), 64)
    unit_of = np.repeat(np.arange(len(sizes)), sizes)
    perm = np.random.default_rng(0).permutation(len(unit_of))[: 65 * GLOBAL_BATCH].reshape(65, GLOBAL_BATCH)
    sets = [set(unit_of[p].tolist()) for p in perm]
    full = {"units_per_micro_batch": float(np.mean([len(s) for s in sets])),
            "consecutive_jaccard": float(np.mean([len(a & b) / len(a | b) for a, b in zip(sets, sets[1:])]))}
    return {"window": window, "units": c.n_units, "micro_batch": GLOBAL_BATCH, "ours": ours, "full_shuffle": full}


def corpus_section(quick: bool, say, with_peers: bool = True) -> dict:
    rows = 200_000 if quick else 10_500_000
    tmp = Path(tempfile.mkdtemp(prefix="launch-bench-corpus-"))
    try:
        shards = 8 if quick else SHARDS
        say(f"corpus: generating {rows:,} rows in {shards} Parquet shards under {tmp}")
        t0 = time.perf_counter()
        info = generate(tmp, rows, shards, 4096 if quick else ROW_GROUP)
        info["generate_s"] = round(time.perf_counter() - t0, 1)
        window = (64 * info["row_group_rows"] // GLOBAL_BATCH) * GLOBAL_BATCH  # what data.shuffle_window=0 picks here
        say(f"corpus: ours on all {info['files']} shards at 1, 2 and 3 ranks")
        res = {"corpus": info, "ours": _runs(probes.OURS, {"path": str(tmp / "train"), "val": str(tmp / "val"), "window": window}, info["bytes"])}
        quarter = tmp / "quarter"
        quarter.mkdir()
        for f in sorted((tmp / "train").glob("*.parquet"))[: info["files"] // 4]:
            os.symlink(f, quarter / f.name)
        say("corpus: ours on a quarter of the shards, one rank (memory against the corpus's size)")
        res["quarter"] = _summary(_ranks(probes.OURS, [{"path": str(quarter), "val": str(tmp / "val"), "window": window, "rank": 0, "k": 1, "batch": GLOBAL_BATCH}]),
                                  sum(f.stat().st_size for f in quarter.glob("*.parquet")), 1)
        res["side_by_side"] = side_by_side(tmp, 2 if quick else 4, window, say, with_peers)
        say("corpus: index build time and size; shuffle statistics")
        res["index"] = index_cost(tmp, 200_000 if quick else 10_000_000)
        res["shuffle"] = shuffle_quality(tmp, window)
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _table(runs_by_reader: dict) -> list[str]:
    lines = ["| reader | ranks | rows/s (all ranks) | epoch s | read / (corpus/k) | decoded / (corpus/k) | peak RSS MB per rank |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, runs in runs_by_reader.items():
        if isinstance(runs, str):
            lines.append(f"| {name} | | {runs} | | | | |")
            continue
        for r in runs:
            if "error" in r:
                lines.append(f"| {name} | | failed: {r['error']} | | | | |")
                continue
            lines.append(f"| {name} | {r['ranks']} | {r['rows_per_s']:,} | {r['seconds']} | {r['read_vs_share']} | {r.get('decoded_vs_share', '')} | {r['peak_rss_mb']} |")
    return lines


def markdown(d: dict) -> list[str]:
    c, sb = d["corpus"], d["side_by_side"]
    lines = [f"### Corpus: {c['rows']:,} rows, {c['files']} Parquet shards, {c['bytes'] / 2**30:.2f} GiB, row groups of {c['row_group_rows']:,} rows; global batch {GLOBAL_BATCH}", "",
             *_table({"ours": d["ours"]}), "",
             f"Side by side on the first {sb['files']} shards ({sb['rows'] or 0:,} rows, {sb['bytes'] / 2**20:.0f} MiB)"
             + (f"; MDS written in {sb['mds_write_s']:.0f} s" if sb.get("mds_write_s") else "") + ":", "",
             *_table({k: sb[k] for k in ("ours", "hf_datasets", "mosaicml_streaming")})]
    i, s, q = d["index"], d["shuffle"], d.get("quarter", {})
    lines += ["", f"Ours on a quarter of the shards ({q.get('rows', 0):,} rows), one rank: peak RSS {q.get('peak_rss_mb')} MB "
              f"(all shards: {d['ours'][0].get('peak_rss_mb')} MB): a rank holds a block's run and its caches, whatever the corpus's size.",
              f"Index: Parquet {i['parquet']['rows']:,} rows in {i['parquet']['files']} files ({i['parquet']['units']:,} row groups): {i['parquet']['seconds']} s, "
              f"{i['parquet']['index_bytes'] / 1024:.0f} KiB; JSONL {i['jsonl']['rows']:,} rows ({i['jsonl']['bytes'] / 2**20:.0f} MiB): {i['jsonl']['seconds']} s the first time "
              f"(one read), {i['jsonl']['cached_seconds']} s from its cache ({i['jsonl']['index_bytes'] / 1024:.0f} KiB).",
              f"Shuffle (blocks of {s['window']:,} rows, micro-batch {s['micro_batch']}, {s['units']} row groups): {s['ours']['units_per_micro_batch']:.1f} row groups per micro-batch "
              f"(a full shuffle: {s['full_shuffle']['units_per_micro_batch']:.1f}); consecutive micro-batches share {s['ours']['consecutive_jaccard']:.2f} of their row groups "
              f"(a full shuffle: {s['full_shuffle']['consecutive_jaccard']:.2f}).", ""]
    return lines
