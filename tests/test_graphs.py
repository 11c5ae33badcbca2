"""Issue 13: the whole-step CUDA graph path. On the CPU: its decision logic, and its data flow
with a stand-in graph that replays the captured step function (same code path as on CUDA except
the capture itself). The `gpu` tests run the real thing where CUDA is present."""

from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace

import pytest
import torch

from launch import config
from launch.errors import UserError
from launch.processes.dist import DistEnv, setup
from launch.processes.stopping import Stopped
from launch.train import graph_step
from launch.train.loop import train
from tests.helpers import PY, SMALL, output, run, single

GRAPH_JOB = [*SMALL, "data.n_train=389", "train.device=cpu", "train.momentum=0.9", "train.grad_clip=0.5", "train.schedule=cosine", "train.warmup_steps=3"]


def rt(device="cuda", world_size=1):
    return SimpleNamespace(device=torch.device(device), env=SimpleNamespace(world_size=world_size))


@pytest.mark.parametrize("overrides, device, ws, in_memory, needle", [
    ([], "cpu", 1, True, "the device is cpu, not CUDA"),
    ([], "cuda", 2, True, "2 DDP processes"),
    ([], "cuda", 1, False, "not in-memory tensors"),
    (["train.accum_steps=2"], "cuda", 1, True, "train.accum_steps > 1"),
    (["train.precision=fp16"], "cuda", 1, True, "GradScaler"),
    (["train.compile=true"], "cuda", 1, True, "train.compile is on"),
])
def test_on_refuses_what_a_graph_cannot_hold_and_auto_falls_back(overrides, device, ws, in_memory, needle):
    on = config.load(None, ["train.cuda_graphs=on", *overrides])
    with pytest.raises(UserError, match=needle):
        graph_step.decide(on, rt(device, ws), in_memory, 1000)
    auto = config.load(None, ["train.cuda_graphs=auto", *overrides])
    assert graph_step.decide(auto, rt(device, ws), in_memory, 1000) == (False, "")


def test_auto_decides_by_size_and_stays_off_until_measured():
    auto = config.load(None, ["data.batch_size=10"])
    assert auto.train.cuda_graphs == "auto"
    use, note = graph_step.decide(auto, rt(), True, 90_902)  # the seeds' scale 1
    assert not use and "qualifies" in note and graph_step.AUTO_TURNS_ON is False
    use, note = graph_step.decide(auto, rt(), True, 900_090_002)  # scale 100: compute-bound
    assert not use and "compute-bound" in note
    use, note = graph_step.decide(config.load(None, ["train.cuda_graphs=on"]), rt(), True, 900_090_002)
    assert use and "on" in note
    assert graph_step.decide(config.load(None, ["train.cuda_graphs=off"]), rt(), True, 10) == (False, "")


class ReplayStandIn:
    """Records the step function instead of capturing kernels; replay() runs it."""

    replays = 0

    def __init__(self, body):
        self.body = body

    def replay(self):
        ReplayStandIn.replays += 1
        self.body()


def run_graphed(monkeypatch, run_dir, *overrides, graphs=True):
    monkeypatch.setattr(graph_step, "blockers", lambda cfg, rt, in_memory: [])
    monkeypatch.setattr(graph_step, "CudaGraph", ReplayStandIn)
    cfg = config.load(None, [*GRAPH_JOB, f"run.dir={run_dir}", f"train.cuda_graphs={'on' if graphs else 'off'}", *overrides])
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = train(cfg, setup(cfg, DistEnv("plain")))
    return result, torch.load(run_dir / "model.pt", weights_only=True), out.getvalue()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_graph_path_computes_what_the_eager_step_computes(tmp_path, monkeypatch, optimizer):
    ReplayStandIn.replays = 0
    eager, we, _ = run_graphed(monkeypatch, tmp_path / "eager", f"train.optimizer={optimizer}", graphs=False)
    assert ReplayStandIn.replays == 0
    graphed, wg, out = run_graphed(monkeypatch, tmp_path / "graphed", f"train.optimizer={optimizer}")
    # 389 samples at batch 16: 24 full batches and a short one per epoch; 3 warm-up steps run eagerly
    assert ReplayStandIn.replays == 2 * 24 - graph_step.WARMUP
    assert "cuda_graphs on: on" in out
    for k in we:
        assert (we[k] - wg[k]).abs().max().item() <= 1e-6, k
    assert graphed["train_loss"] == pytest.approx(eager["train_loss"], abs=1e-6)


def test_graph_path_stops_on_request_and_resumes_bitwise(tmp_path, monkeypatch):
    _, ref, _ = run_graphed(monkeypatch, tmp_path / "ref")
    monkeypatch.setenv("LAUNCH_FAULT", "stop:step=30")
    with pytest.raises(Stopped, match="mid-epoch 1"):
        run_graphed(monkeypatch, tmp_path / "run")
    monkeypatch.delenv("LAUNCH_FAULT")
    _, again, out = run_graphed(monkeypatch, tmp_path / "run")
    assert "resumed from" in out
    for k in ref:
        assert torch.equal(ref[k], again[k]), k


def test_cpu_run_with_auto_is_the_eager_run(tmp_path):
    p = single(tmp_path / "auto", "train.device=cpu", "train.epochs=1")
    assert p.returncode == 0, output(p)
    assert "cuda_graphs" not in p.stdout


# --------------------------------------------------------------------------- the real thing (GPU lane)

CUDA_JOB = [o for o in GRAPH_JOB if o != "train.device=cpu"] + ["train.device=cuda"]


def _weights(d):
    return torch.load(d / "model.pt", weights_only=True, map_location="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_gpu_graphed_equals_eager_after_two_epochs(tmp_path, optimizer):
    runs = {}
    for mode in ("off", "on"):
        p = run([PY, "train_single.py", *CUDA_JOB, f"train.optimizer={optimizer}", f"train.cuda_graphs={mode}", f"run.dir={tmp_path / mode}"], timeout=300)
        assert p.returncode == 0, output(p)
        runs[mode] = _weights(tmp_path / mode)
    assert "cuda_graphs on: on" in p.stdout
    for k in runs["off"]:
        assert (runs["off"][k] - runs["on"][k]).abs().max().item() <= 1e-6, k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphs_stop_on_request_and_resume_bitwise(tmp_path):
    cmd = [PY, "train_single.py", *CUDA_JOB, "train.cuda_graphs=on"]
    ref = run([*cmd, f"run.dir={tmp_path / 'ref'}"], timeout=300)
    assert ref.returncode == 0, output(ref)
    stopped = run([*cmd, f"run.dir={tmp_path / 'run'}"], timeout=300, LAUNCH_FAULT="stop:step=30")
    assert stopped.returncode == 75 and "mid-epoch 1" in stopped.stderr, output(stopped)
    again = run([*cmd, f"run.dir={tmp_path / 'run'}"], timeout=300)
    assert again.returncode == 0 and "resumed from" in again.stdout, output(again)
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    for k in a:
        assert torch.equal(a[k], b[k]), k
