"""Issue 11: your own task through the same launcher: sequence models, regression, custom losses,
dict batches, a model's own loss; misfits refused in one line; the guarantees kept (DDP equals one
process, exact eval, bitwise resume)."""

from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch

from launch import config
from launch.errors import UserError
from launch.observe.logger import read_metrics
from launch.processes.dist import DistEnv, setup
from launch.train.loop import train
from tests import jobs
from tests.helpers import PY, ROOT, SMALL, output, run, single, spawn
from tests.test_models import launch_inproc

SEQ = ["model.name=tests.user_code:SeqGRU", "data.name=tests.user_code:Tokens", "train.optimizer=adamw", "train.lr=0.01", "log.progress=false", "train.device=cpu"]
REG = ["model.name=tests.user_code:Linear1", "data.name=tests.user_code:Regression", "train.loss=mse", "train.lr=0.05", "log.progress=false", "train.device=cpu"]


def train_inproc(run_dir, *overrides):
    cfg = config.load(None, [f"run.dir={run_dir}", *overrides])
    with jobs.one_thread(), contextlib.redirect_stdout(io.StringIO()):
        result = train(cfg, setup(cfg, DistEnv("plain")))
    return result, torch.load(run_dir / "model.pt", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_sequence_model_ddp_2_equals_one_process(tmp_path):
    """[B, T, V] logits with [B, T] targets, some ignored: token-weighted loss; 101 sequences. The 2 ranks
    are spawned gloo ranks running the loop (tests/jobs.py): no launcher is under test here."""
    one, w1 = train_inproc(tmp_path / "one", *SEQ, "data.batch_size=16", "train.epochs=2")
    jobs.run_jobs(2, [("two", [*SEQ, "data.batch_size=8", "train.epochs=2", f"run.dir={tmp_path / 'two'}"], "")], tmp_path / "out")
    assert jobs.ended(tmp_path / "out", "two")["ended"] == "done", jobs.log(tmp_path / "out", "two")
    w2 = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    assert max_diff(w1, w2) <= 1e-5
    rec = read_metrics(tmp_path / "two")[-1]
    assert rec["train_loss"] == pytest.approx(one["train_loss"], abs=1e-5)
    assert rec["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-5)
    assert rec["eval_accuracy"] == pytest.approx(one["eval_accuracy"], abs=1e-9)
    assert "eval_accuracy" in rec and one["eval_samples"] == 101


def test_sequence_model_learns_and_accuracy_is_per_token(tmp_path):
    result, _ = train_inproc(tmp_path, *SEQ, "data.batch_size=8", "train.epochs=12", "train.lr=0.02")
    assert result["eval_accuracy"] > 0.8, result
    assert result["eval_loss"] < 1.0


def test_regression_with_mse_learns_and_reports_no_accuracy(tmp_path):
    result, w = train_inproc(tmp_path, *REG, "data.batch_size=16", "train.epochs=15")
    assert "eval_accuracy" not in result
    assert result["eval_loss"] < 0.1, result  # the targets' variance is about 14
    assert torch.allclose(w["lin.weight"], torch.tensor([[1.0, -2.0, 0.5, 0.0, 3.0]]), atol=0.1)


def test_custom_loss_by_import_path_equals_the_builtin_it_spells_out(tmp_path):
    builtin, wb = train_inproc(tmp_path / "mse", *REG, "train.epochs=2")
    custom, wc = train_inproc(tmp_path / "fn", *REG, "train.epochs=2", "train.loss=tests.user_code:squared_error")
    assert max_diff(wb, wc) <= 1e-6
    assert custom["eval_loss"] == pytest.approx(builtin["eval_loss"], rel=1e-6)


def test_a_models_own_loss_is_used(tmp_path):
    """OwnLoss.loss(batch) returns (sum of |error|, count): the same as train.loss=l1 on that model."""
    own, wo = train_inproc(tmp_path / "own", *REG, "model.name=tests.user_code:OwnLoss", "train.epochs=3")
    l1, wl = train_inproc(tmp_path / "l1", *REG, "train.loss=l1", "train.epochs=3")
    assert "eval_accuracy" not in own and max_diff(wo, wl) <= 1e-6
    assert own["eval_loss"] == pytest.approx(l1["eval_loss"], rel=1e-6) and own["eval_loss"] < own["train_loss"] * 1.5


def test_dict_batch_with_two_inputs(tmp_path):
    result, w = train_inproc(
        tmp_path, "model.name=tests.user_code:TwoInputs", "data.name=tests.user_code:DictBlobs",
        "data.batch_size=8", "train.epochs=8", "train.lr=0.3", "log.progress=false", "train.device=cpu",
    )
    assert result["eval_samples"] == 97 and result["eval_accuracy"] > 0.8
    assert w["a.weight"].shape == (8, 4) and w["b.weight"].shape == (8, 2)


@pytest.mark.parametrize("overrides, needle", [
    # the regression without train.loss=mse: float targets and one logit
    (["model.name=tests.user_code:Linear1", "data.name=tests.user_code:Regression"], "train.loss=cross_entropy needs integer class targets"),
    (["model.name=tests.user_code:SeqGRU", "data.name=tests.user_code:Tokens", "train.loss=mse"], "same shape, got model output [4, 10, 12] and target [4, 10]"),
    (["model.name=tests.user_code:Linear1", "data.name=tests.user_code:Tokens"], "RuntimeError: mat1 and mat2 must have the same dtype"),
    (["model.name=tests.user_code:Linear1", "model.kwargs={features: 6}", "data.name=tests.user_code:Blobs"], "over a single logit is always 0"),
    (["model.name=tests.user_code:Linear1", "data.name=tests.user_code:Regression", "data.kwargs={shape: flat}", "train.loss=mse"], "model output [4, 1] and target [4]"),
    (["model.name=tests.user_code:Linear1", "data.name=tests.user_code:Triples", "train.loss=mse"], "an item must be (inputs, target) or a dict"),
    (["model.name=tests.user_code:Linear1", "data.name=tests.user_code:Regression", "train.loss=tests.user_code:nope"], "has no 'nope'"),
])
def test_misfits_are_one_line_before_anything_is_written(tmp_path, overrides, needle):
    with pytest.raises(UserError) as e:
        train_inproc(tmp_path / "run", "log.progress=false", "train.device=cpu", *overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_regression_without_mse_is_refused_from_the_command_line(tmp_path):
    p = run([PY, "train_single.py", "model.name=tests.user_code:Linear1", "data.name=tests.user_code:Regression", "train.device=cpu", f"run.dir={tmp_path / 'r'}"], timeout=60)
    assert p.returncode == 2, output(p)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs integer class targets" in lines[0] and "train.loss=mse" in lines[0], output(p)
    assert not (tmp_path / "r").exists()


def test_predict_plot_and_eval_follow_the_task(tmp_path):
    """Regression: predicted values, eval loss without accuracy, a loss-only plot named after the
    loss. Sequence model: --eval works, and the predictions CSV is refused in one line."""
    import csv
    import importlib.util
    import json

    reg, _ = train_inproc(tmp_path / "reg", *REG, "train.epochs=3")
    seq, _ = train_inproc(tmp_path / "seq", *SEQ, "train.epochs=2", "data.batch_size=16")
    ev = launch_inproc("predict", tmp_path / "reg", "--eval", "-o", tmp_path / "reg.csv")
    assert ev.returncode == 0, output(ev)
    got = json.loads(ev.stdout.splitlines()[0])
    assert "accuracy" not in got and got["loss"] == pytest.approx(reg["eval_loss"], rel=1e-9) and got["samples"] == 203
    rows = list(csv.reader(open(tmp_path / "reg.csv")))
    assert rows[0] == ["row", "prediction", "label"] and len(rows) == 204 and all(float(r[1]) == float(r[1]) for r in rows[1:])
    assert all(float(r[2]) == float(r[2]) for r in rows[1:])  # the split's own targets (issue 22.11), values like the predictions
    sev = launch_inproc("predict", tmp_path / "seq", "--eval")
    assert sev.returncode == 0 and json.loads(sev.stdout)["accuracy"] == pytest.approx(seq["eval_accuracy"], rel=1e-9), output(sev)
    refused = launch_inproc("predict", tmp_path / "seq")
    assert refused.returncode == 2 and "a sequence model): use --eval" in refused.stderr, output(refused)
    if importlib.util.find_spec("matplotlib"):
        from launch.commands.plot import plot_runs

        assert plot_runs([str(tmp_path / "reg")], tmp_path / "reg.png").stat().st_size > 1000


# ---------------------------------------------------------------- a LightningModule (issue 22 #7)
STANDIN = ROOT / "tests" / "fixtures" / "lightning_standin"
LIT = ["model.name=tests.user_models:LitClassifier", "train.epochs=2"]


def _lightning_env(which: str) -> dict:
    if which == "lightning":
        pytest.importorskip("lightning", reason="lightning is not installed (optional: pip install -e '.[bench]'); the stand-in variant runs")
        return {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # where it was found
    return {"PYTHONPATH": f"{STANDIN}{os.pathsep}{ROOT}"}  # before the real package, where that is installed


@pytest.mark.parametrize("which", ["stand-in", "lightning"])
def test_a_lightning_module_trains_through_its_training_step_and_ddp_equals_one_process(tmp_path, which):
    """training_step is the loss (label-smoothed here, so not train.loss's), self.log is dropped, the
    one line says configure_optimizers is not used; --nproc 2 equals one process; eval_loss is the
    step's loss over the evaluation split, recomputed here from model.pt."""
    extra = _lightning_env(which)
    one = single(tmp_path / "one", *LIT, **extra)
    assert one.returncode == 0, output(one)
    assert "loss: LitClassifier.training_step" in one.stdout and "not used: configure_optimizers" in one.stdout, output(one)
    two = spawn(2, tmp_path / "two", *LIT, "data.batch_size=8", **extra)
    assert two.returncode == 0, output(two)
    w1, w2 = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("one", "two"))
    assert max_diff(w1, w2) <= 1e-6

    from launch.data.build import build_data
    from tests.user_models import LitClassifier  # the same weights under nn.Module when no lightning is importable here

    cfg = config.load(None, [*SMALL, f"run.dir={tmp_path / 'x'}"])
    data = build_data(cfg)
    model = LitClassifier()
    model.load_state_dict(w1)
    model.eval()
    x, y = data.eval.x, data.eval.y
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.2).item()
        plain = torch.nn.functional.cross_entropy(model(x), y).item()
    rec = read_metrics(tmp_path / "one")[-1]
    assert rec["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(plain - expected) > 1e-3  # the step's loss is told apart from train.loss's


def test_a_lightning_module_without_training_step_says_what_trains_it(tmp_path):
    p = single(tmp_path, "model.name=tests.user_models:LitForwardOnly", "train.epochs=1", **_lightning_env("stand-in"))
    assert p.returncode == 0, output(p)
    assert "note: LitForwardOnly is a LightningModule trained through forward with train.loss=cross_entropy: training_step, " in p.stdout, output(p)


def test_a_lightning_step_returning_a_sum_is_one_line(tmp_path):
    p = single(tmp_path, "model.name=tests.user_models:LitSumLoss", "train.epochs=1", **_lightning_env("stand-in"))
    assert p.returncode != 0
    assert "LitSumLoss.training_step must return the mean" in p.stderr and "Traceback" not in p.stderr, output(p)
    assert not (tmp_path / "model.pt").exists()


def test_a_loss_module_attribute_is_not_taken_for_a_loss_method(tmp_path):
    """`self.loss = nn.CrossEntropyLoss()` is the model's criterion, not loss(batch): train.loss through forward."""
    result, _ = train_inproc(tmp_path, *SMALL, "model.name=tests.user_models:LossModule", "train.epochs=1")
    assert result["eval_samples"] == 100 and "eval_accuracy" in result
