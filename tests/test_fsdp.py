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
from tests.helpers import PY, output, run
from tests.test_models import max_diff, spawn, train_inproc

# A 2-block transformer (its blocks live in an nn.ModuleList: sharded one by one, then the root) on
# 385 sums: no batch size used here divides it, so every epoch ends on a short, uneven step.
GPT = ["model.name=launch.examples.sums_lm:TinyGPT", "model.kwargs={seq_len: 9, d_model: 32, n_heads: 2}",
       "data.name=launch.examples.sums_lm:SumsDataset", "data.kwargs={n: 385, n_eval: 101}", "data.eval_batch_size=32",
       "train.epochs=2", "train.accum_steps=2", "train.grad_clip=0.5", "train.optimizer=sgd", "train.lr=0.3",
       "train.check_every_steps=2", "log.progress=false", "train.device=cpu"]
FSDP = ["dist.strategy=fsdp"]


RUNS = {"fsdp2": (2, 24, [*FSDP, "ckpt.every_steps=2"]), "fsdp3": (3, 16, FSDP), "ddp2": (2, 24, [])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process at batch 48 (in this process), and FSDP(2), FSDP(3), DDP(2) at the same global batch."""
    base = tmp_path_factory.mktemp("fsdp")
    one, w1, _ = train_inproc(base / "one", *GPT, "data.batch_size=48")
    for name, (k, b, extra) in RUNS.items():
        p = spawn(k, base / name, *GPT, f"data.batch_size={b}", *extra)
        assert p.returncode == 0, output(p)
    return base, one, w1


def test_fsdp_at_2_and_3_ranks_equals_one_process_and_ddp(runs):
    """Accumulation (set_requires_gradient_sync), clipping by the global norm over shards, the uneven
    last step and the global-count loss weighting: FSDP(k) at batch 48/k is one process at 48."""
    base, one, w1 = runs
    w = {name: torch.load(base / name / "model.pt", weights_only=True) for name in RUNS}
    assert max_diff(w1, w["fsdp2"]) <= 1e-6 and max_diff(w1, w["fsdp3"]) <= 1e-6
    assert max_diff(w["ddp2"], w["fsdp2"]) <= 1e-7
    rec = read_metrics(base / "fsdp3")[-1]
    assert rec["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-6) and rec["eval_accuracy"] == pytest.approx(one["eval_accuracy"], abs=1e-9)
    assert rec["eval_samples"] == 101  # lockstep evaluation: stand-in batches add nothing
    sharded = sorted(p.name for p in store.checkpoint_dir(base / "fsdp3").iterdir())
    assert "step_00000010.dcp" in sharded and "step_00000010.manifest.json" in sharded


def test_fsdp_resumes_bitwise_and_reshards_to_another_world_size(runs, tmp_path):
    """Stopped mid-epoch (periodic saves written in the background, ckpt.async_save) and rerun: bitwise
    the uninterrupted run with synchronous saves. The same checkpoint continued by 3 ranks at the same
    global batch: the exact sample, the same steps."""
    common = [*GPT, *FSDP, "data.batch_size=24", "ckpt.every_steps=2", "ckpt.async_save=true"]
    shutil.copytree(runs[0] / "fsdp2", tmp_path / "ref")
    stopped = spawn(2, tmp_path / "run", *common, LAUNCH_FAULT="stop:step=6")
    assert stopped.returncode == 75 and "stopped by SIGTERM at step 6" in stopped.stderr, output(stopped)
    shutil.copytree(tmp_path / "run", tmp_path / "three")
    again = spawn(2, tmp_path / "run", *common)
    assert again.returncode == 0 and "resumed from" in again.stdout and "step_00000006.dcp" in again.stdout, output(again)
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("ref", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    three = spawn(3, tmp_path / "three", *common, "data.batch_size=16")
    assert three.returncode == 0 and "written with world size 2, resuming with 3" in three.stdout, output(three)
    assert "changed on resume at step 6: data.batch_size 24 -> 16" in three.stdout
    assert max_diff(a, torch.load(tmp_path / "three" / "model.pt", weights_only=True)) <= 1e-6


def test_a_torn_sharded_checkpoint_falls_back_and_a_planted_payload_is_refused(runs, tmp_path):
    shutil.copytree(runs[0] / "fsdp2", tmp_path / "run")  # checkpoints every 2 steps, 5 steps an epoch, the last 3 kept
    ckdir = store.checkpoint_dir(tmp_path / "run")
    assert store.read_latest(ckdir) == "step_00000010.dcp"
    # a planted payload: .metadata that would run a command when unpickled
    marker = tmp_path / "pwned"
    planted = tmp_path / "planted.dcp"
    shutil.copytree(ckdir / "step_00000008.dcp", planted)
    (planted / ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))
    # ... with a manifest that matches it (a checkpoint from elsewhere comes with its own)
    files = {f"{planted.name}/{f.name}": {"bytes": f.stat().st_size, "sha256": integrity.sha256_file(f)} for f in planted.iterdir()}
    integrity.write_manifest(integrity.manifest_path(planted), files, checkpoint=planted.name)
    e = run([PY, "-m", "launch", "export", str(planted), "-o", str(tmp_path / "x.pt")])
    assert e.returncode == 2 and "refused: its .metadata holds a pickled Python object (posix.system)" in e.stderr, output(e)
    assert not marker.exists() and len(e.stderr.strip().splitlines()) == 1
    # a sharded checkpoint of another model: one line, not DCP's exception (checked in this process)
    from launch.examples.sums_lm import TinyGPT
    from launch.parallel import dcp

    other = TinyGPT(seq_len=9, d_model=16, n_heads=2)
    with pytest.raises(store.CheckpointError, match="does not fit this model"):
        dcp.load(other, torch.optim.SGD(other.parameters(), lr=0.1), ckdir / "step_00000008.dcp", store.load(ckdir / "step_00000008.dcp"), None)
    # one shard of the newest checkpoint lost: the rerun says so, falls back and trains on
    (ckdir / "step_00000010.dcp" / "__1_0.distcp").unlink()
    again = spawn(2, tmp_path / "run", *GPT, *FSDP, "data.batch_size=24", "ckpt.every_steps=2", "train.epochs=3")
    assert again.returncode == 0, output(again)
    assert "__1_0.distcp: listed in step_00000010.manifest.json but unreadable" in again.stdout and "resumed from" in again.stdout and "step_00000008.dcp" in again.stdout, output(again)
    assert list(ckdir.glob("step_00000010.dcp.corrupt-*")), "the torn checkpoint is kept aside"
    # export and predict read a sharded checkpoint whole
    x = run([PY, "-m", "launch", "export", str(tmp_path / "run")])
    assert x.returncode == 0, output(x)
    final = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    exported = torch.load(tmp_path / "run" / "model.step_00000015.pt", weights_only=True)
    assert all(torch.equal(final[k], exported[k]) for k in final)


class Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_full_checkpoint_of_a_stateless_optimizer_resumes_under_fsdp(runs, tmp_path, monkeypatch):
    """Issue 22 #2: one process saves a .pt with SGD without momentum (no optimizer state at all) and
    stops; two FSDP ranks continue it at the same global batch: the uninterrupted one-process run."""
    from launch.processes.stopping import Stopped

    _, _, w1 = runs
    monkeypatch.setenv("LAUNCH_FAULT", "stop:step=4")
    with pytest.raises(Stopped):
        train_inproc(tmp_path, *GPT, "data.batch_size=48")
    monkeypatch.delenv("LAUNCH_FAULT")
    assert store.load(store.checkpoint_dir(tmp_path) / "step_00000004.pt")["optimizer"]["state"] == {}
    p = spawn(2, tmp_path, *GPT, *FSDP, "data.batch_size=24")
    assert p.returncode == 0 and "resumed from" in p.stdout and "step_00000004.pt" in p.stdout, output(p)
    assert "dist.strategy=fsdp: sharded 2 x Block (blocks.0 .. blocks.1), then the root" in p.stdout  # the units, named at start-up
    assert max_diff(w1, torch.load(tmp_path / "model.pt", weights_only=True)) <= 1e-6


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
