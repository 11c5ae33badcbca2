"""Training features, each checked against what it must equal: accumulation == one big batch
(single process and real DDP processes), AMP runs (fp16 clips unscaled gradients), schedules per
step, torch.compile == eager with prefix-free checkpoints, the in-memory data path == the
DistributedSampler / DataLoader order, and exact resume with accumulation."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
from torch.utils.data import Dataset

from launch import config
from launch.data.feeder import Feeder
from launch.data.order import rank_train_indices
from launch.data.types import Split
from launch.models.build import build_model
from launch.observe.logger import read_metrics
from launch.processes.dist import DistEnv, setup
from launch.processes.stopping import Stopped
from launch.train.loop import train
from launch.train.optim import lr_factor
from tests import jobs
from tests.helpers import SMALL

# n_train=90 leaves short tails: batch 8 -> 11 full micro-batches and one of 2, so an accumulation
# group of 4 holds 8+8+8+2 samples; batch 32 -> 32, 32, 26. Weighting by micro-batch count instead
# of by samples would be off there.
TAIL = ["data.n_train=90", "data.n_eval=40"]
RICH = ["train.momentum=0.9", "train.weight_decay=0.001", "train.grad_clip=0.5", "train.schedule=cosine", "train.warmup_steps=2"]


def run_inproc(run_dir, *overrides):
    """launch.train.loop.train in this process (one plain process, one thread as the shared ranks use);
    returns (final record, final weights)."""
    cfg = config.load(None, [*SMALL, f"run.dir={run_dir}", "train.device=cpu", *overrides])
    rt = setup(cfg, DistEnv("plain"))
    with contextlib.redirect_stdout(io.StringIO()), jobs.one_thread():
        result = train(cfg, rt)
    return result, torch.load(run_dir / "model.pt")


def assert_close_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k] - b[k]).abs().max().item()
        assert diff <= atol, f"{k} differs by {diff}"


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulation_equals_one_big_batch_single(tmp_path, optimizer):
    big, wbig = run_inproc(tmp_path / "big", *TAIL, *RICH, f"train.optimizer={optimizer}", "data.batch_size=32", "train.lr=0.05")
    acc, wacc = run_inproc(tmp_path / "acc", *TAIL, *RICH, f"train.optimizer={optimizer}", "data.batch_size=8", "train.accum_steps=4", "train.lr=0.05")
    assert acc["step"] == big["step"] == 2 * 3
    assert_close_weights(wacc, wbig, 1e-6)
    assert abs(acc["train_loss"] - big["train_loss"]) < 1e-6


def test_accumulation_equals_one_big_batch_ddp(tmp_path):
    """2 gloo processes (shared ranks, tests/jobs.py) x batch 4 x accum 4 == one process at batch 32
    (no_sync on all but the last micro-step)."""
    big, wbig = run_inproc(tmp_path / "big", *TAIL, *RICH, "data.batch_size=32")
    jobs.run_jobs(2, [("ddp", [*SMALL, *TAIL, *RICH, "data.batch_size=4", "train.accum_steps=4", "dist.bucket_cap_mb=0.001", f"run.dir={tmp_path / 'ddp'}"], "")],
                  tmp_path / "out")
    assert jobs.ended(tmp_path / "out", "ddp")["ended"] == "done", jobs.log(tmp_path / "out", "ddp")
    wddp = torch.load(tmp_path / "ddp" / "model.pt")
    assert_close_weights(wddp, wbig, 1e-6)
    last = read_metrics(tmp_path / "ddp")[-1]
    assert last["step"] == big["step"] and abs(last["train_loss"] - big["train_loss"]) < 1e-6


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_trains_and_fp16_clips_unscaled_gradients(tmp_path, precision):
    """With clipping on, fp16 must unscale before clipping: clipping the scaled gradients (x65536)
    would shrink every update ~65536-fold. So the distance travelled must match fp32's."""
    clip = ["train.grad_clip=0.5", "train.epochs=1"]
    cfg = config.load(None, SMALL)
    torch.manual_seed(cfg.train.seed)  # the loop's initial weights
    init = build_model(cfg, cfg.data.features, cfg.data.classes).state_dict()
    ref, wref = run_inproc(tmp_path / "fp32", *clip)
    amp, wamp = run_inproc(tmp_path / precision, *clip, f"train.precision={precision}")
    moved = lambda w: math.sqrt(sum(((w[k] - init[k]) ** 2).sum().item() for k in w))  # noqa: E731
    assert 0.8 < moved(wamp) / moved(wref) < 1.25
    assert math.isfinite(amp["train_loss"]) and abs(amp["train_loss"] - ref["train_loss"]) < 0.05
    ck = torch.load(sorted((tmp_path / precision / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)  # main saves a plain str torch_version; this base still pickles TorchVersion
    assert (ck["scaler"] is not None) == (precision == "fp16"), "GradScaler state saved for fp16 only"


def test_schedule_factors():
    cfg = config.load(None, ["train.schedule=cosine", "train.warmup_steps=4", "train.min_lr_ratio=0.1"])
    f = lr_factor(cfg, total_steps=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    step = lr_factor(config.load(None, ["train.schedule=step", "train.step_every=3", "train.gamma=0.5"]), 100)
    assert [step(s) for s in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    assert lr_factor(config.load(None, []), 100)(57) == 1.0


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine"])
def test_schedule_advances_per_optimizer_step(tmp_path, schedule):
    """Logged LR after optimizer step s is lr * factor(s), with accumulation (steps, not micro-batches)."""
    ov = ["train.epochs=1", "train.accum_steps=2", f"train.schedule={schedule}", "train.warmup_steps=3", "train.step_every=4", "log.every_steps=1", "train.lr=0.2"]
    run_inproc(tmp_path, *ov)
    cfg = config.load(None, [*SMALL, *ov])
    steps = [r for r in read_metrics(tmp_path) if "train_loss_step" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))  # 384 samples / (16 x 2)
    f = lr_factor(cfg, 12)
    for r in steps:
        assert r["lr"] == pytest.approx(0.2 * f(r["step"]), rel=1e-12)


def test_compile_matches_eager_and_checkpoints_stay_prefix_free(tmp_path):
    tiny = ["model.hidden=[8]", "data.features=4", "data.n_train=64", "data.n_eval=16", "train.epochs=1"]
    _, eager = run_inproc(tmp_path / "eager", *tiny)
    _, compiled = run_inproc(tmp_path / "compiled", *tiny, "train.compile=true")
    assert_close_weights(compiled, eager, 1e-5)
    ck = torch.load(sorted((tmp_path / "compiled" / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)  # main saves a plain str torch_version; this base still pickles TorchVersion
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in list(ck["model"]) + list(compiled))


class Numbered(Dataset):
    """Sample i is (a vector holding i, i % 3): lets a test read back which samples a batch holds."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((4,), float(i)), i % 3


@pytest.mark.parametrize("workers", [0, 2])
def test_in_memory_and_dataloader_paths_follow_the_same_order(workers):
    """Both paths yield this rank's shard of the epoch permutation in batches, no padding; the
    DistributedSampler's shuffle is the permutation (checked in test_foundation)."""
    n, b, ws, seed = 23, 4, 3, 7
    cfg = config.load(None, [f"data.num_workers={workers}", f"train.seed={seed}", "train.device=cpu"])
    ds = Numbered(n)
    x = torch.stack([ds[i][0] for i in range(n)])
    y = torch.tensor([ds[i][1] for i in range(n)])
    for rank in range(ws):
        mem = Feeder(Split(x, y), cfg, torch.device("cpu"), rank, ws, b)
        loader = Feeder(Split(dataset=ds), cfg, torch.device("cpu"), rank, ws, b)
        for epoch in range(2):
            expected = rank_train_indices(n, seed, epoch, rank, ws).tolist()
            got_mem = [xb[:m, 0].long().tolist() for xb, _, m in mem.train_epoch(seed, epoch)]
            got_dl = [xb[:m, 0].long().tolist() for xb, _, m in loader.train_epoch(seed, epoch)]
            assert got_mem == got_dl == [expected[i : i + b] for i in range(0, len(expected), b)]
            assert all(yb[:m].tolist() == [i % 3 for i in xs] for (_, yb, m), xs in zip(mem.train_epoch(seed, epoch), got_mem))


class Draws(Dataset):
    """Item i: (its index, a number drawn from torch's global generator, as augmentation draws)."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return torch.tensor([float(i), torch.rand(()).item()]), 0


def draws(workers: int, rank: int, world: int, epoch: int) -> dict:
    cfg = config.load(None, [f"data.num_workers={workers}", "train.seed=3", "train.device=cpu"])
    feeder = Feeder(Split(dataset=Draws()), cfg, torch.device("cpu"), rank, world, 4)
    return {int(x[0]): float(x[1]) for xb, _, n in feeder.train_epoch(3, epoch) for x in xb[:n]}


def test_a_samples_randomness_depends_on_seed_epoch_and_index_only():
    """Not on the worker that loads it, data.num_workers or the world size: the same draw for sample i
    in epoch e everywhere, and a new draw in the next epoch."""
    one = draws(0, 0, 1, 0)
    assert sorted(one) == list(range(24))
    two_workers = {**draws(2, 0, 2, 0), **draws(2, 1, 2, 0)}
    assert two_workers == one
    assert draws(1, 0, 1, 0) == one
    nxt = draws(0, 0, 1, 1)
    assert all(nxt[i] != one[i] for i in one)


def test_stop_and_resume_with_accumulation_is_bitwise(tmp_path, monkeypatch):
    """Losses are folded into the float64 sum at agreement points only: a run stopped mid-epoch at
    step 5 and resumed must end with the same weights and the same logged train loss, bit for bit."""
    ov = [*TAIL, *RICH, "data.batch_size=8", "train.accum_steps=3", "train.check_every_steps=2", "train.epochs=2"]
    ref, wref = run_inproc(tmp_path / "ref", *ov)
    monkeypatch.setenv("LAUNCH_FAULT", "stop:step=5")
    with pytest.raises(Stopped):
        run_inproc(tmp_path / "run", *ov)
    monkeypatch.delenv("LAUNCH_FAULT")
    again, wagain = run_inproc(tmp_path / "run", *ov)
    assert again["step"] == ref["step"]
    for k in wref:
        assert torch.equal(wagain[k], wref[k]), k
    assert [r["train_loss"] for r in read_metrics(tmp_path / "run")] == [r["train_loss"] for r in read_metrics(tmp_path / "ref")]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """One plain process, SMALL for one epoch: the reference of the profiler and process-group tests."""
    return run_inproc(tmp_path_factory.mktemp("plain"), "train.epochs=1")


def test_profiler_writes_traces_and_leaves_results_unchanged(tmp_path, plain):
    import json

    _, wplain = plain
    cfg = config.load(None, [*SMALL, f"run.dir={tmp_path / 'prof'}", "train.device=cpu", "train.epochs=1", "log.profile_steps=3:5"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), jobs.one_thread():
        train(cfg, setup(cfg, DistEnv("plain")))
    wprof = torch.load(tmp_path / "prof" / "model.pt")
    trace = tmp_path / "prof" / "profile" / "rank0.steps3-5.pt.trace.json"
    assert trace.is_file() and json.loads(trace.read_text())["traceEvents"]
    assert any(line.startswith("profile: steps 3-5") and "top ops by self time:" in line and "aten::" in line for line in out.getvalue().splitlines()), out.getvalue()
    for k in wplain:
        assert torch.equal(wplain[k], wprof[k]), k


def test_one_process_group_does_not_wrap_the_model_and_equals_a_plain_process(tmp_path, monkeypatch, plain):
    """torchrun --nproc_per_node=1 (a common single-GPU SLURM job): a process group exists, DDP does not."""
    import torch.distributed as dist

    from launch.processes.dist import detect, teardown
    from launch.processes.stopping import StopRequest
    from launch.train.run import start
    from launch.train.step import TrainingModule

    _, wplain = plain
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(store.port), LAUNCH_LAUNCHER="spawn", LAUNCH_STORE_HOSTED="1").items():
        monkeypatch.setenv(k, v)
    cfg = config.load(None, [*SMALL, f"run.dir={tmp_path / 'group'}", "train.device=cpu", "train.epochs=1"])
    rt = setup(cfg, detect())
    try:
        assert rt.env.distributed and dist.is_initialized() and dist.get_world_size() == 1
        with contextlib.redirect_stdout(io.StringIO()), jobs.one_thread():
            run = start(cfg, rt, StopRequest(tmp_path / "STOP"))
            assert type(run.step.module) is TrainingModule, "no DDP wrapper at world size 1"
            run.lock.release()  # train() below sets the run up again
            train(cfg, rt)
    finally:
        teardown(rt)
    wgroup = torch.load(tmp_path / "group" / "model.pt")
    for k in wplain:
        assert torch.equal(wplain[k], wgroup[k]), k
