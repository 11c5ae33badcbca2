"""Issue 16: streams and scale: an IterableDataset trains in one global order (DDP equals one process),
resumes bitwise (restored from its state, or replayed), train.max_steps, data.collate for variable-length
items, the built-in token-file dataset, and an epoch order that costs O(1) per sample. Issues 22 and 24:
a stream that splits itself across DataLoader workers is read whole (no data lost), and one that can
split itself by rank (shard(rank, world_size)) is read 1/k per rank with the same exactness."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import IterableDataset, get_worker_info

from launch import config
from launch.data.feeder import make_feeder
from launch.data.types import Split
from launch.errors import UserError
from launch.examples import token_stream
from launch.observe.logger import read_metrics
from launch.processes.stopping import Stopped
from tests import jobs
from tests.helpers import output
from tests.test_models import max_diff, spawn, train_inproc
from tests.user_models import CountingStream, Tokens

SEQ = ["model.name=tests.user_code:SeqGRU", "train.optimizer=sgd", "train.lr=0.5", "log.progress=false", "train.device=cpu"]
STREAM = [*SEQ, "data.name=tests.user_models:CountingStream", "train.max_steps=1000", "train.epochs=2"]
TOKENS = ["model.name=launch.examples.sums_lm:TinyGPT", "model.kwargs={seq_len: 16}", "data.name=launch.examples.token_stream:TokenStream",
          "data.kwargs={path: data/tokens/train.bin, val_path: data/tokens/val.bin, seq_len: 16}", "data.eval_max_samples=200",
          "data.batch_size=8", "train.optimizer=sgd", "train.lr=0.1", "train.max_steps=14", "log.progress=false", "train.device=cpu"]


def items_of(steps) -> list:
    """(global samples, position, [this rank's first tokens per micro-batch]) per step."""
    out = []
    for st in steps:
        micro = [(x[:n, 0].tolist(), n) for x, _, n in st.batches]
        out.append((st.global_samples, st.position, st.last, micro))
    return out


@pytest.mark.parametrize("k, b, accum, workers", [(2, 4, 1, 0), (3, 4, 2, 0), (2, 5, 3, 2)])
def test_every_rank_takes_its_share_of_one_global_order(k, b, accum, workers):
    """Step j of k ranks at batch b holds the items of step j of one process at batch k*b (the tail
    dealt round-robin, a rank without an item runs a stand-in); with data.num_workers=2 the same."""
    cfg = config.load(None, ["train.device=cpu", f"data.num_workers={workers}", "data.name=tests.user_models:CountingStream"])
    stream = Split(dataset=CountingStream("train", n=77))
    cpu = torch.device("cpu")
    one = items_of(make_feeder(stream, cfg, cpu, 0, 1, k * b).epoch_steps(0, 0, 0, accum))
    ranks = [items_of(make_feeder(stream, cfg, cpu, r, k, b).epoch_steps(0, 0, 0, accum)) for r in range(k)]
    assert all(len(r) == len(one) for r in ranks) and one[-1][1] == 77 and one[-1][2]
    for j, (g, pos, last, micro) in enumerate(one):
        assert all(r[j][:3] == (g, pos, last) for r in ranks)
        for m, (firsts, n) in enumerate(micro):
            got = [t for r in ranks for t in r[j][3][m][0]]
            assert sorted(got) == sorted(firsts) and sum(r[j][3][m][1] for r in ranks) == n


@pytest.fixture(scope="module")
def stream_one(tmp_path_factory):
    """The counting stream in one process at batch 16: the reference for 2 ranks at batch 8."""
    return train_inproc(tmp_path_factory.mktemp("stream_one"), *STREAM, "data.batch_size=16")


VAR = [*SEQ, "data.name=tests.user_models:VarLen", "data.collate=tests.user_models:pad", "train.epochs=2"]
SHARDED = [*STREAM, "data.name=tests.test_streams:RankSharded", "data.batch_size=8", "data.num_workers=1"]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The 2-rank runs of this file that need no launcher of their own, as jobs on one pair of spawned
    gloo ranks (tests/jobs.py). Returns the directory that holds their run directories."""
    base = tmp_path_factory.mktemp("two")
    at = lambda name: f"run.dir={base / name}"  # noqa: E731
    jobs.run_jobs(2, [("stream", [*STREAM, "data.batch_size=8", at("stream")], ""),
                      ("varlen", [*VAR, "data.batch_size=8", "data.num_workers=1", at("varlen")], ""),
                      ("sharded", [*SHARDED, at("sharded")], "")], base / "out")
    return base


def done(base, name: str):
    """The run directory of job `name`, once it is known to have finished."""
    assert jobs.ended(base / "out", name)["ended"] == "done", jobs.log(base / "out", name)
    return base / name


def test_a_stream_under_ddp_equals_one_process(stream_one, two):
    one, w1, _ = stream_one
    run_dir = done(two, "stream")
    w2 = torch.load(run_dir / "model.pt", weights_only=True)
    assert max_diff(w1, w2) <= 1e-6
    rec = read_metrics(run_dir)[-1]
    assert rec["epoch"] == 1 and rec["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-6)


class Counted(token_stream.TokenStream):
    """TokenStream that counts the windows it reads (to tell a restore from a replay)."""

    reads = 0

    def __iter__(self):
        for item in super().__iter__():
            Counted.reads += 1
            yield item


def test_a_stream_resumes_bitwise_from_its_state_or_by_replay(tmp_path, monkeypatch):
    """Stopped after step 10 (of 14, 8 windows each) and rerun: the same weights bit for bit, whether the
    stream restores its saved state (no replay) or has none and is replayed: 80 windows more read."""
    over = [*TOKENS, "data.name=tests.test_streams:Counted", "ckpt.every_steps=4", "train.check_every_steps=2"]
    reads = {}
    for kind in ("restored", "replayed"):
        if kind == "replayed":
            monkeypatch.delattr(token_stream.TokenStream, "state_dict")
        _, ref, _ = train_inproc(tmp_path / kind / "ref", *over)
        monkeypatch.setenv("LAUNCH_FAULT", "stop:step=9")
        with pytest.raises(Stopped):
            train_inproc(tmp_path / kind / "run", *over)
        monkeypatch.delenv("LAUNCH_FAULT")
        Counted.reads = 0
        _, again, out = train_inproc(tmp_path / kind / "run", *over)
        assert "resumed from" in out and "step 10" in out
        assert all(torch.equal(ref[k], again[k]) for k in ref), kind
        reads[kind] = Counted.reads
    assert reads["replayed"] - reads["restored"] == 10 * 8


def test_a_stream_needs_max_steps(tmp_path):
    with pytest.raises(UserError, match=r"is a stream \(an IterableDataset\): set train.max_steps"):
        train_inproc(tmp_path, *SEQ, "data.name=tests.user_models:CountingStream")


def test_max_steps_cuts_an_epoch_and_raising_it_continues_exactly(tmp_path):
    """train.max_steps on map-style data: the run ends mid-epoch (recorded, saved at its position);
    a rerun with a larger max_steps continues there and ends where an uninterrupted run ends."""
    base = [*SEQ, "data.name=tests.user_code:Tokens", "data.batch_size=8", "train.epochs=3"]
    _, ref, _ = train_inproc(tmp_path / "ref", *base, "train.max_steps=20")
    first, _, _ = train_inproc(tmp_path / "run", *base, "train.max_steps=9")
    assert first["step"] == 9 and first["epoch"] == 0  # 13 steps per epoch: cut inside epoch 0
    again, w, out = train_inproc(tmp_path / "run", *base, "train.max_steps=20")
    assert "resumed from" in out and again["step"] == 20
    assert all(torch.equal(ref[k], w[k]) for k in ref)


def test_variable_length_items_with_a_padding_collate_keep_ddp_exact(two, tmp_path):
    """data.collate pads targets with -100: token counts differ per rank; the loss stays token-weighted."""
    one, w1, _ = train_inproc(tmp_path / "one", *VAR, "data.batch_size=16")
    run_dir = done(two, "varlen")  # 2 ranks at batch 8, one DataLoader worker each
    assert max_diff(w1, torch.load(run_dir / "model.pt", weights_only=True)) <= 1e-6
    assert read_metrics(run_dir)[-1]["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-6)


def test_token_files_as_nanogpt_writes_them_train_in_windows(tmp_path):
    result, _, _ = train_inproc(tmp_path, "model.name=launch.examples.sums_lm:TinyGPT", "model.kwargs={seq_len: 16}", "data.name=tokens",
                                "data.path=data/tokens/train.bin", "data.val_path=data/tokens/val.bin", "data.seq_len=16",
                                "data.batch_size=64", "train.optimizer=adamw", "train.lr=0.003", "train.max_steps=40", "log.progress=false", "train.device=cpu")
    assert result["eval_samples"] == (20000 - 1) // 16 and result["eval_loss"] < 2.0  # log(13) = 2.56 before learning
    with pytest.raises(UserError, match="data.seq_len: required for data.name=tokens"):
        config.load(None, ["data.name=tokens", "data.path=data/tokens/train.bin"])


class DocsSplit(IterableDataset):
    """PyTorch's IterableDataset docs pattern: in a DataLoader worker, read only that worker's range."""

    def __init__(self, split: str):
        self.start, self.end, self.base = 0, (256 if split == "train" else 64), (0 if split == "train" else 1000)

    def __iter__(self):
        lo, hi = self.start, self.end
        info = get_worker_info()
        if info is not None:
            per = math.ceil((hi - lo) / info.num_workers)
            lo = self.start + info.id * per
            hi = min(lo + per, self.end)
        for i in range(lo, hi):
            j = self.base + i
            yield torch.tensor([math.sin(j), math.cos(j), (j % 7) / 7.0]), j % 3


class HFSplit(IterableDataset):
    """A Hugging Face IterableDataset of 4 shards (it splits its shards across DataLoader workers), as (x, y)."""

    def __init__(self, split: str):
        import datasets

        n, base = (256, 0) if split == "train" else (64, 1000)
        rows = {"x": [[math.sin(base + i), math.cos(base + i), ((base + i) % 7) / 7.0] for i in range(n)], "y": [(base + i) % 3 for i in range(n)]}
        self.hf = datasets.Dataset.from_dict(rows).to_iterable_dataset(num_shards=4).with_format("torch")

    def __iter__(self):
        for row in self.hf:
            yield row["x"].float(), row["y"]


@pytest.mark.parametrize("name", ["DocsSplit", "HFSplit"])
def test_a_stream_that_splits_itself_across_workers_is_read_whole(name, tmp_path):
    """With data.num_workers=2 each worker used to read half the stream and keep its own steps of that
    half: 128 of 256 items trained, 32 of 64 evaluated, silently. Now the stream's own code sees no
    worker: every item, and the same weights as without workers."""
    base = [f"data.name=tests.test_streams:{name}", "model.hidden=[8]", "model.out_features=3", "data.batch_size=16",
            "train.max_steps=1000", "train.epochs=2", "train.device=cpu", "log.progress=false"]
    zero, w0, _ = train_inproc(tmp_path / "w0", *base, "data.num_workers=0")
    two, w2, _ = train_inproc(tmp_path / "w2", *base, "data.num_workers=2")
    assert zero["step"] == two["step"] == 2 * 256 // 16
    assert zero["eval_samples"] == two["eval_samples"] == 64
    assert all(torch.equal(w0[k], w2[k]) for k in w0)


class RankSharded(IterableDataset):
    """The counting language (as CountingStream) with shard(rank, world_size): round-robin, as the
    contract says, or `uneven` (the first 2/3 to rank 0: whole files per rank, not the contract). Read
    whole under a process group of more than one rank it fails: shard() must have been used."""

    def __init__(self, split: str, n: int = 77, rank: int = 0, world_size: int = 1, uneven: bool = False):
        self.data, self.split, self.n, self.rank, self.k, self.uneven = Tokens(split, n=n), split, n, rank, world_size, uneven

    def shard(self, rank: int, world_size: int):
        return RankSharded(self.split, self.n, rank, world_size, self.uneven)

    def __iter__(self):
        n = len(self.data)
        if self.k == 1:
            idx = range(n)
        elif self.uneven:
            cut = 2 * n // 3
            idx = range(0, cut) if self.rank == 0 else range(cut, n)
        else:
            idx = range(self.rank, n, self.k)
        whole = self.k == 1 and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        for c, i in enumerate(idx):
            if whole and c >= 8:
                raise RuntimeError("read the whole stream: shard() was not used")
            yield self.data[i]


def test_a_stream_that_shards_itself_by_rank_reads_its_share_and_equals_one_process(stream_one, two, tmp_path):
    """2 ranks, each reading only its round-robin shard (reading the whole stream fails): the weights of
    one process at batch 16 reading the whole stream. A shard() that is not round-robin is one line."""
    one, w1, _ = stream_one
    run_dir = done(two, "sharded")
    assert max_diff(w1, torch.load(run_dir / "model.pt", weights_only=True)) <= 1e-6
    assert read_metrics(run_dir)[-1]["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-6)
    p = spawn(2, tmp_path / "uneven", *SHARDED, "data.kwargs={uneven: true}")  # a real launcher: its exit code and line
    assert p.returncode == 2 and "does not deal the stream round-robin" in p.stderr, output(p)
