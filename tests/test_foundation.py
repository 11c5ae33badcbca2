"""Issue 2: the launchers agree with each other, and the distributed math is exact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from launch import config
from launch.data.feeder import Feeder
from launch.data.order import rank_train_indices
from launch.data.types import Split
from launch.errors import UserError
from launch.models.build import NeuralNetwork
from tests import dist_checks, jobs
from tests.helpers import PY, SMALL, output, run, single, spawn, torchrun

# --------------------------------------------------------------------------- sampler (pure)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n", [10, 12])
def test_order_is_distributed_samplers_shuffle_without_its_padding(world_size, n):
    # Same permutation and striding as torch's DistributedSampler; where it pads the epoch to a
    # multiple of the world size by repeating samples, we stop: shards differ by at most one sample.
    for epoch in range(3):
        shards = []
        for rank in range(world_size):
            ref = DistributedSampler(list(range(n)), num_replicas=world_size, rank=rank, shuffle=True, seed=5)
            ref.set_epoch(epoch)
            ours = rank_train_indices(n, 5, epoch, rank, world_size).tolist()
            assert ours == list(ref)[: len(ours)]
            shards.append(ours)
        flat = [i for s in shards for i in s]
        assert sorted(flat) == list(range(n)), "each sample exactly once per epoch"
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_mid_epoch_start_is_the_remaining_positions():
    # Resuming at global position s: each rank's remaining indices are the tail of its full shard.
    full = [rank_train_indices(12, 3, 2, r, 3).tolist() for r in range(3)]
    rest = [rank_train_indices(12, 3, 2, r, 3, start=6).tolist() for r in range(3)]
    assert rest == [f[2:] for f in full]


@pytest.mark.parametrize("n, b, k", [(23, 4, 3), (25, 4, 3), (7, 2, 3), (11, 5, 2)])
def test_step_j_of_k_ranks_is_step_j_of_one_process_at_k_times_the_batch(n, b, k):
    """The global samples of every micro-step match one process at batch k*b, the last step's
    samples are dealt as evenly as possible (a rank may get none), and every rank makes the same
    number of micro-steps (so every rank calls the same collectives)."""
    cfg = config.load(None, ["train.device=cpu"])
    x, y = torch.arange(n).float()[:, None], torch.arange(n)
    one = [t[:m].tolist() for _, t, m in Feeder(Split(x, y), cfg, torch.device("cpu"), 0, 1, k * b).train_epoch(9, 1)]
    per_rank = [list(Feeder(Split(x, y), cfg, torch.device("cpu"), r, k, b).train_epoch(9, 1)) for r in range(k)]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == len(one)
    for j, ref in enumerate(one):
        parts = [per_rank[r][j] for r in range(k)]
        got = [i for _, t, m in parts for i in t[:m].tolist()]
        assert sorted(got) == sorted(ref)
        sizes = [m for _, _, m in parts]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(ref)
        for _, t, m in parts:
            assert len(t) == max(m, 1), "a rank with no sample runs a one-sample stand-in"


# --------------------------------------------------------------------------- real gloo groups


# 385 samples divide by neither 2, 3 nor the batch, and leave ONE sample for the last micro-step:
# at world size 2 and 3 the other ranks have nothing in it (they run a zero-weight stand-in).
UNEVEN = "data.n_train=385"
ACCUM = [*SMALL, UNEVEN, "data.batch_size=8", "train.accum_steps=2"]  # 3 processes x batch 8 x 2 accumulation steps = 48 per optimizer step


def _checks_then_jobs(rank: int, k: int, checks_port: int, checks_out: str, jobs_port: int, job_list: list, jobs_out: str) -> None:
    """One set of spawned ranks for two things: the gloo checks, then training runs (tests/jobs.py)."""
    dist_checks._worker(rank, k, checks_port, checks_out)
    jobs._worker(rank, k, jobs_port, job_list, jobs_out)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory, e2e):
    """3 spawned gloo ranks: the checks of tests/dist_checks.py, then the accumulation run (3 x batch 8
    x 2 accumulation steps, <e2e>/accum3) trained on the same ranks; what the ranks printed and how the
    run ended in <e2e>/out."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    d = tmp_path_factory.mktemp("ws3")
    (e2e / "out").mkdir()
    stores = [dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False) for _ in range(2)]
    job_list = [("accum3", [*ACCUM, f"run.dir={e2e / 'accum3'}"], "")]
    mp.start_processes(_checks_then_jobs, args=(3, stores[0].port, str(d), stores[1].port, job_list, str(e2e / "out")), nprocs=3, start_method="spawn")
    return [torch.load(d / f"rank{r}.pt", weights_only=True) for r in range(3)]


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory, three_ranks):
    """World size 1 in this process (a real gloo group of one rank, its environment and thread count
    put back afterwards), 2 on spawned ranks, 3 on those of `three_ranks`."""
    import torch.distributed as dist

    d, env, threads = tmp_path_factory.mktemp("ws1"), dict(os.environ), torch.get_num_threads()
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    try:
        dist_checks._worker(0, 1, store.port, str(d))
    finally:
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)
    return {1: [torch.load(d / "rank0.pt", weights_only=True)], 2: dist_checks.run_checks(2, str(tmp_path_factory.mktemp("ws2"))), 3: three_ranks}


def test_sampler_shards_disjoint_cover_and_reshuffle(gloo_results):
    ranks = gloo_results[3]
    n = dist_checks.N_TRAIN
    assert all(r["backend"] == "gloo" for r in ranks)
    for epoch in range(3):
        shards = [r["shards"][epoch] for r in ranks]
        flat = [i for s in shards for i in s]
        assert sorted(flat) == list(range(n)), "every sample exactly once: no padding, no duplicates"
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert ranks[0]["shards"][0] != ranks[0]["shards"][1], "set_epoch must change the order"
    # Feeder really yields those shards, with an equal number of batches on each rank
    batches = [r["batches_epoch1"] for r in ranks]
    assert len({len(b) for b in batches}) == 1
    assert [[i for b in bs for i in b] for bs in batches] == [r["shards"][1] for r in ranks]


def test_exact_eval_identical_for_world_sizes(gloo_results):
    ref_loss, ref_acc, ref_n = gloo_results[1][0]["eval"]
    assert ref_n == dist_checks.N_EVAL
    for ws in (2, 3):
        for r in gloo_results[ws]:
            loss, acc, count = r["eval"]
            assert count == dist_checks.N_EVAL, "each evaluation sample counted exactly once"
            assert acc == ref_acc
            assert loss == pytest.approx(ref_loss, rel=1e-12, abs=1e-12)


def test_exact_eval_of_a_sequence_task_for_world_sizes(gloo_results):
    """Token-weighted: the loss is the mean over non-ignored tokens of all 11 sequences, whatever the split."""
    ref = gloo_results[1][0]["seq_eval"]
    assert ref["eval_samples"] == dist_checks.N_SEQ
    for ws in (2, 3):
        for r in gloo_results[ws]:
            got = r["seq_eval"]
            assert got["eval_samples"] == dist_checks.N_SEQ
            assert got["eval_accuracy"] == ref["eval_accuracy"]
            assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def runs(e2e, three_ranks):
    """The launchers on one tiny job: per-process batch 16; single at 32 and 48 matches k=2, 3. Each
    launcher runs once for real; the reference at 48 runs in this process, and accum3 (3 processes x
    batch 8 x 2 accumulation steps = 48 per optimizer step) on the spawned ranks of `three_ranks`."""
    base = e2e
    procs = {
        "single32": single(base / "single32", UNEVEN, "data.batch_size=32"),
        "spawn2": spawn(2, base / "spawn2", UNEVEN),
        "torchrun3": torchrun(3, base / "torchrun3", UNEVEN),
    }
    _train_in_process(base / "single48", *SMALL, UNEVEN, "data.batch_size=48")
    return base, procs


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)


def test_every_launcher_writes_the_run_directory(runs):
    base, procs = runs
    for name, p in procs.items():
        assert p.returncode == 0, output(p)
        assert "done: eval_accuracy" in p.stdout
    assert jobs.ended(base / "out", "accum3")["ended"] == "done", jobs.log(base / "out", "accum3")
    for name in (*procs, "single48", "accum3"):  # the references too, trained in this process and on spawned ranks
        d = base / name
        assert (d / "config.yaml").is_file() and (d / "model.pt").is_file() and (d / "checkpoints" / "latest").is_file()
        assert len(_metrics(d)) == 2, name
    assert "launcher=torchrun" in procs["torchrun3"].stdout and "world_size=3" in procs["torchrun3"].stdout
    assert "launcher=spawn" in procs["spawn2"].stdout and "world_size=2" in procs["spawn2"].stdout
    assert "launcher=plain" in procs["single32"].stdout


def test_ddp_weights_load_strict_into_the_bare_model(runs):
    base, _ = runs
    state = _weights(base / "torchrun3")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    model = NeuralNetwork(16, [32, 16], 2)
    model.load_state_dict(state, strict=True)


@pytest.mark.parametrize("ddp,ref", [("spawn2", "single32"), ("torchrun3", "single48"), ("accum3", "single48")])
def test_ddp_equals_single_process_at_the_same_global_batch(runs, ddp, ref):
    base, _ = runs
    a, b = _weights(base / ddp), _weights(base / ref)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, f"max |delta| = {diff}"
    ma, mb = _metrics(base / ddp), _metrics(base / ref)
    for ra, rb in zip(ma, mb):
        assert ra["step"] == rb["step"]
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-6)
        assert ra["eval_loss"] == pytest.approx(rb["eval_loss"], abs=1e-6)
        assert ra["eval_accuracy"] == rb["eval_accuracy"]


def test_default_job_learns(tmp_path):
    # The defaults alone (what `python train_single.py` trains), in-process to save a start-up.
    result = _train_in_process(tmp_path)
    assert result["eval_accuracy"] >= 0.75, f"the default job should clearly beat chance (0.5), got {result['eval_accuracy']}"


# --------------------------------------------------------------------------- config


def test_cli_beats_file_beats_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.5\n  epochs: 3\ndata:\n  batch_size: 8\n")
    cfg = config.load(str(f), ["train.lr=0.25", "model.hidden=[4, 5]"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.data.batch_size, cfg.model.hidden) == (0.25, 3, 8, [4, 5])
    assert cfg.train.optimizer == "sgd" and cfg.run.dir == "runs/c"
    with pytest.raises(UserError, match="did you mean 'train.lr'"):
        config.load(None, ["train.lrr=1"])


def test_every_field_has_a_docstring():
    import dataclasses

    for section in dataclasses.fields(config.Config):
        cls = section.default_factory
        docs = config.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{section.name}: fields without a docstring: {missing}"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train.lrr=0.1"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        (["data.batch_size=abc"], "data.batch_size: expected an integer"),
        (["train.lr=-0.1"], "train.lr: must be > 0"),
        (["data.batch_size=0"], "data.batch_size: must be > 0"),
        (["model.hidden=[64,0]"], "model.hidden[1]: must be > 0"),
        (["train.device=cuda"], "train.device=cuda but CUDA is not available"),
    ],
)
@pytest.mark.parametrize("script", ["train_single.py", "train_ddp.py"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle, script):
    extra = ["--nproc", "2"] if script == "train_ddp.py" else []
    p = run([PY, script, *extra, f"run.dir={tmp_path / 'r'}", *args], timeout=30, CUDA_VISIBLE_DEVICES="")  # as on a machine without a GPU
    assert p.returncode == 2, output(p)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], output(p)
    assert p.wall < 15
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_readme_config_reference_is_current():
    readme = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    block = readme.split("<!-- config-reference:start (regenerate: python -m launch.config) -->\n")[1].split("\n<!-- config-reference:end -->")[0]
    assert block == config.reference_markdown(), "docs/config.md is stale: python -m launch.config"


def _train_in_process(tmp_path, *overrides):
    from launch.processes import dist as dist_mod
    from launch.train.loop import train

    cfg = config.load(None, [f"run.dir={tmp_path}", "log.progress=false", "train.device=cpu", *overrides])
    rt = dist_mod.setup(cfg, dist_mod.DistEnv("plain"))
    with jobs.one_thread():  # as the launchers' processes run (OMP_NUM_THREADS=1 in tests/helpers.py)
        return train(cfg, rt)


def test_user_model_and_dataset_by_import_path(tmp_path):
    result = _train_in_process(
        tmp_path, "model.name=tests.user_code:TinyNet", "model.kwargs={width: 16}", "data.name=tests.user_code:Blobs",
        "data.batch_size=8", "train.epochs=3", "data.num_workers=1",
    )
    assert result["eval_samples"] == 96 and result["eval_accuracy"] > 0.6
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["body.0.weight"].shape == (16, 6)


def test_toy_config_runs(tmp_path):
    result = _train_in_process(tmp_path / "toy", "data.name=toy", "model.hidden=[8,8]", "data.batch_size=1", "train.epochs=30")
    assert result["eval_samples"] == 2 and result["step"] == 150
