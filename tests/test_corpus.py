"""Issue 24: corpora on disk (Parquet, JSONL, Hugging Face datasets directories) read by row group, each
rank decoding about its 1/k; one epoch order for every world size and data.num_workers, so DDP equals one
process and a run stopped at 2 ranks continues exactly at 3; the corpus recorded in checkpoints; bad
input one line each. Small corpora generated here: shards of uneven sizes, row groups of 8 rows."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from launch import config  # noqa: E402
from launch.data.build import build_data  # noqa: E402
from launch.data.feeder import make_feeder  # noqa: E402
from launch.errors import UserError  # noqa: E402
from launch.observe.logger import read_metrics  # noqa: E402
from launch.processes.dist import DistEnv, setup  # noqa: E402
from launch.processes.stopping import Stopped  # noqa: E402
from launch.train.loop import train  # noqa: E402
from tests import jobs  # noqa: E402
from tests.helpers import ROOT  # noqa: E402
from tests.test_models import max_diff  # noqa: E402
from tests.test_models import train_inproc as _train_inproc  # noqa: E402

TRAIN_SIZES, VAL_SIZES = (61, 0, 97, 43, 83), (37, 29)  # no shard divides a global batch of 12
CPU = torch.device("cpu")


def rows(n: int, first: int, rng) -> dict:
    x = rng.normal(size=(n, 4))
    y = ((x[:, 0] - x[:, 1] + 0.5 * x[:, 2] * x[:, 3]) > 0).astype(np.int64) + (x[:, 3] > 1).astype(np.int64)
    return {"id": np.arange(first, first + n, dtype=np.float64), "a": x[:, 0], "b": x[:, 1], "v": [list(r) for r in x[:, 2:]], "label": y}


def write(root: Path, sizes, rng, first: int = 0) -> list[dict]:
    """Parquet shards (row groups of 8), the same rows as JSONL shards; returns the row dicts."""
    (root / "pq").mkdir(parents=True)
    (root / "jsonl").mkdir()
    out = []
    for i, n in enumerate(sizes):
        r = rows(n, first, rng)
        first += n
        pq.write_table(pa.table({**r, "v": pa.array(r["v"], pa.list_(pa.float64()))}), root / "pq" / f"part-{i}.parquet", row_group_size=8)
        with open(root / "jsonl" / f"part-{i}.jsonl", "w") as f:
            for j in range(n):
                f.write(json.dumps({k: (r[k][j].item() if hasattr(r[k][j], "item") else r[k][j]) for k in r}) + "\n")
        out.append(r)
    return out


def write_hf(root: Path, parts: list[dict]) -> None:
    import datasets

    whole = {k: [v for p in parts for v in (p[k].tolist() if hasattr(p[k], "tolist") else p[k])] for k in parts[0]}
    with contextlib.redirect_stderr(io.StringIO()):
        datasets.Dataset.from_dict(whole).save_to_disk(str(root / "hf"), num_shards=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    parts = write(root / "train", TRAIN_SIZES, rng)
    val = write(root / "val", VAL_SIZES, rng, first=10_000)
    if importlib_has("datasets"):
        write_hf(root / "train", parts)
        write_hf(root / "val", val)
    return root


def importlib_has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def data_args(root: Path, fmt: str = "pq", *extra) -> list[str]:
    name = {"pq": "parquet", "jsonl": "jsonl", "hf": "hf"}[fmt]
    return [f"data.name={name}", f"data.path={root}/train/{fmt}", f"data.val_path={root}/val/{fmt}", "data.target=label", *extra]


TAB = ["model.hidden=[16]", "train.lr=0.1", "train.epochs=2", "log.progress=false", "train.device=cpu", "data.feature_columns=[a,b,v]"]


def train_inproc(run_dir, *overrides):
    """One process in this process, on one thread (as the shared ranks run)."""
    with jobs.one_thread():
        return _train_inproc(run_dir, *overrides)


def build(*overrides):
    cfg = config.load(None, ["train.device=cpu", *overrides])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        return build_data(cfg), cfg, out.getvalue()


def epoch(data, cfg, k: int, b: int, accum: int = 1, start: int = 0, ep: int = 0):
    """Every rank's steps as (global, position, last, [(ids of real samples) per micro-batch], decoded bytes)."""
    out = []
    for r in range(k):
        f = make_feeder(data.train, cfg, CPU, r, k, b)
        steps = [(s.global_samples, s.position, s.last, [x[:n, 0].long().tolist() for x, _, n in s.batches]) for s in f.epoch_steps(0, ep, start, accum)]
        out.append((steps, f.decoded_bytes))
    return out


@pytest.mark.parametrize("k, b, accum, workers", [(2, 6, 1, 0), (3, 4, 2, 2)])
def test_every_world_size_and_worker_count_deals_one_global_order(corpus, k, b, accum, workers):
    """Micro-batch j of k ranks at batch b holds the samples of micro-batch j of one process at batch k*b;
    each sample once per epoch; a resume from step 3 continues with one process's steps."""
    ids = data_args(corpus, "pq", "data.feature_columns=[id,a]", "data.standardize=false", f"data.num_workers={workers}")
    data, cfg, _ = build(*ids)
    [(one, _)] = epoch(data, cfg, 1, k * b, accum)
    ranks = epoch(data, cfg, k, b, accum)
    assert all(len(steps) == len(one) for steps, _ in ranks)
    for j, (g, pos, last, micro) in enumerate(one):
        assert all(steps[j][:3] == (g, pos, last) for steps, _ in ranks)
        for m, firsts in enumerate(micro):
            assert sorted(t for steps, _ in ranks for t in steps[j][3][m]) == sorted(firsts)
    seen = [t for _, _, _, micro in one for m in micro for t in m]
    assert len(seen) == len(set(seen)) == sum(TRAIN_SIZES) == len(data.train)
    [(rest, _)] = epoch(data, cfg, 1, k * b, accum, start=one[2][1])
    assert rest == one[3:]
    [(other, _)] = epoch(data, cfg, 1, k * b, accum, ep=1)
    assert [m for s in other for m in s[3]] != [m for s in one for m in s[3]]  # a new order every epoch


def test_a_rank_decodes_about_its_share_of_the_corpus(tmp_path):
    """2,000 rows in 250 row groups: one process decodes each row group once an epoch; of 3 ranks each
    decodes about a third (the units at the edges of its runs are shared with a neighbour)."""
    rng = np.random.default_rng(1)
    write(tmp_path, (250,) * 8, rng)
    data, cfg, said = build("data.name=parquet", f"data.path={tmp_path}/pq", "data.target=label", "data.val_fraction=0.1")
    split = data.train.dataset
    total = int(split.source.reader.unit_bytes[split.units].sum())  # a unit is a row group here
    [(_, whole)] = epoch(data, cfg, 1, 12)
    assert whole == total
    shares = [decoded for _, decoded in epoch(build(*cfg_args(cfg))[0], cfg, 3, 4)]
    assert max(shares) <= 1.25 * total / 3 and sum(shares) <= 1.2 * total, (shares, total)
    assert "a rank decodes" in said


def cfg_args(cfg) -> list[str]:
    d = cfg.data
    return ["data.name=parquet", f"data.path={d.path}", "data.target=label", "data.val_fraction=0.1"]


def test_text_windows_are_the_documents_joined_with_eos(tmp_path):
    from launch.examples.corpus_lm import write_corpus

    root = write_corpus(str(tmp_path))
    data, cfg, said = build("data.name=parquet", f"data.path={root}/train", f"data.val_path={root}/val", "data.text=text",
                            f"data.tokenizer={root}/tokenizer", "data.seq_len=16")
    split = data.train.dataset
    tok = split.source.maker.tokenizer()
    docs = pq.read_table(sorted((root / "train").glob("*.parquet"))[0]).column("text").to_pylist()[:32]
    joined = [t for d in tok(docs, add_special_tokens=False)["input_ids"] for t in (*d, tok.eos_token_id)]
    x, y = split[0]
    assert x.tolist() == joined[:16] and y.tolist() == joined[1:17]
    x1, _ = split[1]
    assert x1.tolist() == joined[17:33]
    assert len(split) == int(split.samples.sum()) and "dropped at unit ends" in said


def test_the_jsonl_index_finds_every_block_start_across_read_chunks(tmp_path, monkeypatch):
    from launch.data.corpus import jsonl

    monkeypatch.setattr(jsonl, "CHUNK", 97)  # line ends fall on every side of a chunk's end
    p = tmp_path / "x.jsonl"
    p.write_text("".join(f'{{"a": {i}, "label": {i % 2}}}\n' for i in range(2 * jsonl.BLOCK_LINES + 5)))
    data = p.read_bytes()
    want = [0] + [i + 1 for i, c in enumerate(data) if c == 10][jsonl.BLOCK_LINES - 1 :: jsonl.BLOCK_LINES]
    assert jsonl._line_starts(p, len(data)).tolist() == [w for w in want if w < len(data)] and len(want) == 3


def test_the_same_rows_in_parquet_jsonl_and_a_datasets_directory_train_to_the_same_weights(corpus, tmp_path):
    formats = ["pq", "jsonl"] + (["hf"] if importlib_has("datasets") else [])
    weights = {}
    for fmt in formats:
        res, weights[fmt], _ = train_inproc(tmp_path / fmt, *TAB, *data_args(corpus, fmt, "data.unit_rows=8"), "data.batch_size=12", "train.epochs=1")
        assert res["eval_samples"] == sum(VAL_SIZES)
    for fmt in formats[1:]:
        assert all(torch.equal(weights["pq"][k], weights[fmt][k]) for k in weights["pq"]), fmt


def _bad(root: Path, case: str) -> list[str]:
    """Write a corpus with one problem; the settings that read it."""
    rng = np.random.default_rng(2)
    good = rows(20, 0, rng)
    table = pa.table({**good, "v": pa.array(good["v"], pa.list_(pa.float64()))})
    root.mkdir()
    pq.write_table(table, root / "a.parquet", row_group_size=8)
    args = ["data.name=parquet", f"data.path={root}", "data.target=label", "data.val_fraction=0.5"]
    if case == "schema":
        pq.write_table(table.set_column(1, "a", pa.array(np.arange(20))), root / "b.parquet")
    elif case == "missing":
        pq.write_table(table.drop_columns(["b"]), root / "b.parquet")
    elif case == "target":
        args.append("data.target=nope")
    elif case == "corrupt":
        (root / "b.parquet").write_bytes(b"PAR1" + bytes(100) + b"PAR1")
    elif case in ("null feature", "null target"):
        col = "a" if case == "null feature" else "label"
        values = table.column(col).to_pylist()
        values[5] = None
        pq.write_table(table.set_column(table.schema.get_field_index(col), col, pa.array(values, table.schema.field(col).type)), root / "b.parquet")
    elif case == "not text":
        args += ["data.text=id", "data.tokenizer=x", "data.seq_len=8"]
    elif case == "bad json":
        (root / "c.jsonl").write_text('{"a": 1, "label": 0}\n{"a": 2, "label":\n')
        args = ["data.name=jsonl", f"data.path={root}/c.jsonl", "data.target=label", "data.val_fraction=0.5"]
    elif case == "dataset dict":
        (root / "dataset_dict.json").write_text('{"splits": ["train"]}')
        (root / "train").mkdir()
        args[0] = "data.name=hf"
    return args


@pytest.mark.parametrize("case, message", [
    ("schema", r"b.parquet: column 'a' is int64, .*a.parquet has double: the shards' schemas differ"),
    ("missing", r"b.parquet: no column 'b' \(.*a.parquet has it\)"),
    ("target", r"no column 'nope' for data.target"),
    ("corrupt", r"corrupt Parquet file .*b.parquet"),
    ("null feature", r"b.parquet unit 0: column 'a' holds 1 null"),
    ("null target", r"b.parquet unit 0: column 'label' holds 1 null"),
    ("not text", r"data.text column 'id' is double, not text"),
    ("bad json", r"c.jsonl line 2: not a JSON object per line"),
    ("dataset dict", r"is a DatasetDict: point data.path .* \(train\)"),
])
def test_bad_input_is_one_line_naming_file_and_column(tmp_path, case, message):
    args = _bad(tmp_path / "c", case)
    with pytest.raises(UserError, match=message) as e:
        build(*args)
    assert "\n" not in str(e.value)


def test_an_empty_shard_is_skipped_and_said_and_a_tokenizer_needs_eos(corpus, tmp_path):
    _, _, said = build(*data_args(corpus))
    assert "skipped 1 empty file(s) of data.path: part-1.parquet" in said
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"a": 0, "<unk>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "t").mkdir()
    pq.write_table(pa.table({"text": ["a a", "a"] * 8}), tmp_path / "t" / "t.parquet", row_group_size=4)
    with pytest.raises(UserError, match="the tokenizer has no EOS token"):
        build("data.name=parquet", f"data.path={tmp_path}/t", "data.text=text", f"data.tokenizer={tmp_path}/tok", "data.seq_len=4")
    with pytest.raises(UserError, match="data.tokenizer: required with data.text"):
        config.load(None, ["data.name=parquet", "data.path=x", "data.text=text", "data.seq_len=4"])


# ---------------------------------------------------------------------------------------------- processes

DDP = ["ckpt.every_steps=8", "train.check_every_steps=4"]


@pytest.fixture(scope="module")
def one(corpus, tmp_path_factory):
    """One process at the global batch of 12: the reference for every other run."""
    d = tmp_path_factory.mktemp("one")
    return train_inproc(d, *TAB, *DDP, *data_args(corpus), "data.batch_size=12") + (d,)


@pytest.fixture(scope="module")
def ranks(corpus, tmp_path_factory):
    """The multi-process runs on shared gloo ranks (tests/jobs.py): 2 ranks at 6 stopped at step 30 (as
    a signal would stop them); then on 3 ranks at 4, a whole run and the stopped run continued with 2
    DataLoader workers each."""
    d = tmp_path_factory.mktemp("ranks")
    common = [*TAB, *DDP, *data_args(corpus)]
    jobs.run_jobs(2, [("cut", [*common, "data.batch_size=6", f"run.dir={d / 'cut'}"], "stop:step=30")], d / "out2")
    jobs.run_jobs(3, [("three", [*common, "data.batch_size=4", f"run.dir={d / 'three'}"], ""),
                      ("cut", [*common, "data.batch_size=4", "data.num_workers=2", f"run.dir={d / 'cut'}"], "")], d / "out3")
    return d


def test_three_ranks_equal_one_process(ranks, one):
    res, w1, _, _ = one
    assert jobs.ended(ranks / "out3", "three")["ended"] == "done", jobs.log(ranks / "out3", "three")
    assert max_diff(w1, torch.load(ranks / "three" / "model.pt", weights_only=True)) <= 1e-6
    rec = read_metrics(ranks / "three")[-1]
    assert rec["eval_samples"] == res["eval_samples"] == sum(VAL_SIZES) and rec["eval_loss"] == pytest.approx(res["eval_loss"], abs=1e-6)


def test_stopped_at_two_ranks_resumed_at_three_equals_the_uninterrupted_run(ranks, one):
    """2 ranks stop mid-epoch 1 (step 30 of 48); 3 ranks with 2 DataLoader workers each continue at the
    same global batch: the weights of the uninterrupted run."""
    _, w1, _, _ = one
    assert jobs.ended(ranks / "out2", "cut")["ended"] == "stopped", jobs.log(ranks / "out2", "cut")
    text = jobs.log(ranks / "out3", "cut")
    assert jobs.ended(ranks / "out3", "cut")["ended"] == "done", text
    assert "resumed from" in text and "world size 2, resuming with 3" in text
    assert max_diff(w1, torch.load(ranks / "cut" / "model.pt", weights_only=True)) <= 1e-6


def test_stop_and_rerun_is_bitwise_and_a_changed_corpus_is_refused_or_accepted(corpus, one, tmp_path, monkeypatch):
    _, w1, _, _ = one
    shutil.copytree(corpus / "train" / "pq", tmp_path / "data" / "train")
    args = [*TAB, *DDP, "data.name=parquet", f"data.path={tmp_path}/data/train", f"data.val_path={corpus}/val/pq", "data.target=label", "data.batch_size=12"]
    monkeypatch.setenv("LAUNCH_FAULT", "stop:step=13")
    with pytest.raises(Stopped):
        train_inproc(tmp_path / "run", *args)
    monkeypatch.delenv("LAUNCH_FAULT")
    keep = tmp_path / "kept"
    shutil.copytree(tmp_path / "run", keep)
    _, again, out = train_inproc(tmp_path / "run", *args)
    assert "resumed from" in out and all(torch.equal(w1[k], again[k]) for k in w1)
    pq.write_table(pq.read_table(tmp_path / "data" / "train" / "part-3.parquet").slice(0, 40), tmp_path / "data" / "train" / "part-3.parquet")
    with pytest.raises(UserError, match=r"the corpus changed since the checkpoint \(train: part-3.parquet changed \(\d+ -> \d+ bytes, 43 -> 40 rows\)\).*data.accept_corpus_change=true"):
        train_inproc(keep, *args)
    res, _, out = train_inproc(keep, *args, "data.accept_corpus_change=true")
    assert "the interrupted epoch starts its order afresh" in out and res["step"] > 13


def test_the_parquet_lm_recipe_runs_as_written_on_the_generated_corpus(tmp_path, monkeypatch):
    """configs/parquet_lm.yaml with the corpus launch.examples.corpus_lm writes (shortened to 12 steps):
    both commands run from tmp_path, in this process (`python -m launch.examples.corpus_lm data/corpus`
    through its __main__, then the config file as train_single.py loads it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["corpus_lm", "data/corpus"])
    from launch.examples import corpus_lm

    with contextlib.redirect_stdout(io.StringIO()):
        runpy.run_path(corpus_lm.__file__, run_name="__main__")  # the module's own command line, as `python -m` runs it
    cfg = config.load(str(ROOT / "configs" / "parquet_lm.yaml"), ["train.device=cpu", "train.max_steps=12"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), jobs.one_thread():
        train(cfg, setup(cfg, DistEnv("plain")))
    said = out.getvalue()
    assert "data: parquet corpus data/corpus/train: 5 file(s)" in said and "skipped 1 empty file(s)" in said, said
    rec = read_metrics(tmp_path / "runs" / "parquet_lm")[-1]
    assert rec["step"] == 12 and rec["eval_loss"] < 2.7  # log(15) = 2.71 before learning
