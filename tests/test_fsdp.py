"""Issue 18: FSDP2 sharding keeps the proofs: one process's updates, bitwise resume at the same world
size, resharding to another, torn and planted sharded checkpoints refused, errors in one line."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from launch import config
from launch.checkpoint import integrity, store
from launch.errors import UserError
from launch.observe.logger import read_metrics
from launch.parallel.blocks import blocks
from tests import jobs
from tests.test_models import max_diff, train_inproc

# A 2-block transformer (its blocks live in an nn.ModuleList: sharded one by one, then the root) on
# 385 sums: no batch size used here divides it, so every epoch ends on a short, uneven step.
GPT = ["model.name=launch.examples.sums_lm:TinyGPT", "model.kwargs={seq_len: 9, d_model: 32, n_heads: 2}",
       "data.name=launch.examples.sums_lm:SumsDataset", "data.kwargs={n: 385, n_eval: 101}", "data.eval_batch_size=32",
       "train.epochs=2", "train.accum_steps=2", "train.grad_clip=0.5", "train.optimizer=sgd", "train.lr=0.3",
       "train.check_every_steps=2", "log.progress=false", "train.device=cpu"]
FSDP = ["dist.strategy=fsdp"]
CUT = [*GPT, *FSDP, "data.batch_size=24", "ckpt.every_steps=2", "ckpt.async_save=true"]  # stopped mid-epoch: periodic saves in the background


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process at batch 48 (in this process, and one stopped at step 4), then FSDP(2), DDP(2) and
    the stop-and-rerun runs on one set of 2 spawned gloo ranks (tests/jobs.py: each run fresh, resumed
    from disk)."""
    from launch.processes.stopping import Stopped

    base = tmp_path_factory.mktemp("fsdp")
    with jobs.one_thread():
        one, w1, _ = train_inproc(base / "one", *GPT, "data.batch_size=48")
        os.environ["LAUNCH_FAULT"] = "stop:step=4"
        try:
            with pytest.raises(Stopped):
                train_inproc(base / "stateless", *GPT, "data.batch_size=48")
        finally:
            del os.environ["LAUNCH_FAULT"]
    stateless = store.load(store.checkpoint_dir(base / "stateless") / "step_00000004.pt")["optimizer"]["state"]
    jobs.run_jobs(2, [("fsdp2", [*GPT, *FSDP, "data.batch_size=24", "ckpt.every_steps=2", at(base, "fsdp2")], ""),
                      ("ddp2", [*GPT, "data.batch_size=24", at(base, "ddp2")], ""),
                      ("run", [*CUT, at(base, "run")], "stop:step=6"), ("run", [*CUT, at(base, "run")], ""),
                      ("three", [*CUT, at(base, "three")], "stop:step=6"),  # the same stop again, continued by 3 ranks
                      ("stateless", [*GPT, *FSDP, "data.batch_size=24", at(base, "stateless")], "")], base / "out2")
    return base, one, w1, stateless


def at(base, name: str) -> str:
    return f"run.dir={base / name}"


@pytest.fixture(scope="module")
def three(runs):
    """FSDP(3), and the second stopped run continued by 3 ranks, on one set of 3 spawned gloo ranks."""
    base = runs[0]
    jobs.run_jobs(3, [("fsdp3", [*GPT, *FSDP, "data.batch_size=16", at(base, "fsdp3")], ""),
                      ("three", [*CUT, "data.batch_size=16", at(base, "three")], "")], base / "out3")
    return base / "out3"


@pytest.fixture(scope="module")
def torn(runs):
    """A copy of FSDP(2)'s run with one shard of its newest checkpoint lost (checkpoints every 2 steps,
    5 steps an epoch, the last 3 kept), rerun for a third epoch on 2 spawned gloo ranks."""
    base = runs[0]
    shutil.copytree(base / "fsdp2", base / "torn")
    (store.checkpoint_dir(base / "torn") / "step_00000010.dcp" / "__1_0.distcp").unlink()
    jobs.run_jobs(2, [("torn", [*GPT, *FSDP, "data.batch_size=24", "ckpt.every_steps=2", "train.epochs=3", at(base, "torn")], "")], base / "out_torn")
    return base / "out_torn"


def weights(base, name: str) -> dict:
    return torch.load(base / name / "model.pt", weights_only=True)


def test_fsdp_at_2_and_3_ranks_equals_one_process_and_ddp(runs, three):
    """Accumulation (set_requires_gradient_sync), clipping by the global norm over shards, the uneven
    last step and the global-count loss weighting: FSDP(k) at batch 48/k is one process at 48."""
    base, one, w1, _ = runs
    for out, name in ((base / "out2", "fsdp2"), (base / "out2", "ddp2"), (three, "fsdp3")):
        assert jobs.ended(out, name)["ended"] == "done", jobs.log(out, name)
    w = {name: weights(base, name) for name in ("fsdp2", "fsdp3", "ddp2")}
    assert max_diff(w1, w["fsdp2"]) <= 1e-6 and max_diff(w1, w["fsdp3"]) <= 1e-6
    assert max_diff(w["ddp2"], w["fsdp2"]) <= 1e-7
    rec = read_metrics(base / "fsdp3")[-1]
    assert rec["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-6) and rec["eval_accuracy"] == pytest.approx(one["eval_accuracy"], abs=1e-9)
    assert rec["eval_samples"] == 101  # lockstep evaluation: stand-in batches add nothing
    sharded = sorted(p.name for p in store.checkpoint_dir(base / "fsdp3").iterdir())
    assert "step_00000010.dcp" in sharded and "step_00000010.manifest.json" in sharded


def test_fsdp_resumes_bitwise_and_reshards_to_another_world_size(runs, three):
    """Stopped mid-epoch (periodic saves written in the background, ckpt.async_save) and rerun: bitwise
    the uninterrupted run with synchronous saves. The same stop (a second run stopped there) continued by
    3 ranks at the same global batch: the exact sample, the same steps."""
    base, out2, out3 = runs[0], runs[0] / "out2", three
    for name in ("run", "three"):
        stopped = jobs.ended(out2, name)
        assert stopped["ended"] == "stopped" and "stopped by SIGTERM at step 6" in stopped["message"], (stopped, jobs.log(out2, name))
    again = jobs.log(out2, "run", attempt=2)
    assert jobs.ended(out2, "run", attempt=2)["ended"] == "done" and "resumed from" in again and "step_00000006.dcp" in again, again
    a, b = weights(base, "fsdp2"), weights(base, "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    resharded = jobs.log(out3, "three")
    assert jobs.ended(out3, "three")["ended"] == "done" and "written with world size 2, resuming with 3" in resharded, resharded
    assert "changed on resume at step 6: data.batch_size 24 -> 16" in resharded
    assert max_diff(a, weights(base, "three")) <= 1e-6


def test_a_torn_sharded_checkpoint_falls_back_and_a_planted_payload_is_refused(runs, torn, tmp_path, capsys):
    base = runs[0]
    ckdir = store.checkpoint_dir(base / "fsdp2")  # checkpoints every 2 steps, 5 steps an epoch, the last 3 kept
    assert store.read_latest(ckdir) == "step_00000010.dcp"
    # a planted payload: .metadata that would run a command when unpickled
    marker = tmp_path / "pwned"
    planted = tmp_path / "planted.dcp"
    shutil.copytree(ckdir / "step_00000008.dcp", planted)
    (planted / ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))
    # ... with a manifest that matches it (a checkpoint from elsewhere comes with its own)
    files = {f"{planted.name}/{f.name}": {"bytes": f.stat().st_size, "sha256": integrity.sha256_file(f)} for f in planted.iterdir()}
    integrity.write_manifest(integrity.manifest_path(planted), files, checkpoint=planted.name)
    from launch.commands import cli  # the export command, in this process (no process group here)

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(planted), "-o", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "refused: its .metadata holds a pickled Python object (posix.system)" in err, err
    assert not marker.exists() and len(err.strip().splitlines()) == 1
    # a sharded checkpoint of another model: one line, not DCP's exception (checked in this process)
    from launch.examples.sums_lm import TinyGPT
    from launch.parallel import dcp

    other = TinyGPT(seq_len=9, d_model=16, n_heads=2)
    with pytest.raises(store.CheckpointError, match="does not fit this model"):
        dcp.load(other, torch.optim.SGD(other.parameters(), lr=0.1), ckdir / "step_00000008.dcp", store.load(ckdir / "step_00000008.dcp"), None)
    # one shard of the newest checkpoint lost (in a copy, by the fixture): the rerun says so, falls back and trains on
    again = jobs.log(torn, "torn")
    assert jobs.ended(torn, "torn")["ended"] == "done", again
    assert "__1_0.distcp: listed in step_00000010.manifest.json but unreadable" in again and "resumed from" in again and "step_00000008.dcp" in again, again
    assert list(store.checkpoint_dir(base / "torn").glob("step_00000010.dcp.corrupt-*")), "the torn checkpoint is kept aside"
    # export and predict read a sharded checkpoint whole
    with pytest.raises(SystemExit) as x:
        cli.main(["export", str(base / "torn")])
    assert x.value.code == 0
    final = weights(base, "torn")
    exported = torch.load(base / "torn" / "model.step_00000015.pt", weights_only=True)
    assert all(torch.equal(final[k], exported[k]) for k in final)


class Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_full_checkpoint_of_a_stateless_optimizer_resumes_under_fsdp(runs):
    """Issue 22 #2: one process saves a .pt with SGD without momentum (no optimizer state at all) and
    stops; two FSDP ranks continue it at the same global batch: the uninterrupted one-process run."""
    base, _, w1, stateless = runs
    assert stateless == {}
    p = jobs.log(base / "out2", "stateless")
    assert jobs.ended(base / "out2", "stateless")["ended"] == "done" and "resumed from" in p and "step_00000004.pt" in p, p
    assert "dist.strategy=fsdp: sharded 2 x Block (blocks.0 .. blocks.1), then the root" in p  # the units, named at start-up
    assert max_diff(w1, weights(base, "stateless")) <= 1e-6


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class SequentialBlocks(torch.nn.Module):
    """timm's ViT keeps its blocks in an nn.Sequential, not an nn.ModuleList."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.head = torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2)
        self.blocks = torch.nn.Sequential(*[Block() for _ in range(3)])


def test_repeated_blocks_in_an_nn_sequential_are_units_too():
    """Issue 22 #10: else the whole stack would be one unit and sharding would save little."""
    from launch.models.build import NeuralNetwork
    from launch.parallel.blocks import describe

    model = SequentialBlocks()
    found = blocks(model, [])
    assert found == list(model.blocks)[::-1] and describe(model, found) == "3 x Block (blocks.0 .. blocks.2)"
    mlp = NeuralNetwork(8, [16, 16], 2)
    assert describe(mlp, blocks(mlp, [])) == "3 x Linear (linear_relu_stack.1 .. linear_relu_stack.5)"


def test_fsdp_mistakes_are_one_line():
    from launch.examples.sums_lm import TinyGPT

    model = TinyGPT(seq_len=9)
    assert len(blocks(model, [])) == 2 and len(blocks(model, ["Block"])) == 2
    with pytest.raises(UserError, match=r"dist.fsdp_blocks=\['Blok'\]: no module of this model has that class \(its classes: Block, "):
        blocks(model, ["Blok"])
    with pytest.raises(UserError, match="dist.param_dtype: applies to dist.strategy=fsdp only"):
        config.load(None, ["dist.param_dtype=bf16"])
    with pytest.raises(UserError, match=r"dist.cpu_offload=true needs a CUDA device"):
        _fsdp_cpu_offload()
    with pytest.raises(UserError, match="dist.strategy=fsdp: the model has no trainable parameters to shard"):
        _two_rank_strategy().prepare(torch.nn.Sequential(torch.nn.ReLU()), None, None)


def _fsdp_cpu_offload():
    from launch.parallel.fsdp import Sharded
    from launch.processes.dist import DistEnv, Runtime

    cfg = config.load(None, ["dist.strategy=fsdp", "dist.cpu_offload=true", "train.device=cpu"])
    Sharded(cfg, Runtime(DistEnv("plain"), torch.device("cpu"), None), print)


def _two_rank_strategy():
    """The FSDP strategy as a rank of two sees it, before anything is sharded (no process group needed)."""
    from launch.parallel.fsdp import Sharded
    from launch.processes.dist import DistEnv, Runtime

    cfg = config.load(None, ["dist.strategy=fsdp", "train.device=cpu"])
    return Sharded(cfg, Runtime(DistEnv("torchrun", 0, 0, 2, 2, "127.0.0.1", 1), torch.device("cpu"), None), print)
