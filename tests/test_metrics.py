"""Issue 19, point 2: train.metrics, exact over the whole evaluation split for any world size.

The distributed cases run on real gloo process groups (tests/metric_checks.py spawns the ranks);
world size 1 is the plain process path. The reference is an independent numpy computation on all
predictions at once (pairwise AUROC, scikit-learn's F1 algorithm written out). Tolerances: metrics
that are ratios of counts (accuracy, top5, F1, AUROC) 1e-12 relative, i.e. equal up to the last
division's rounding; loss, MSE and MAE 1e-6 relative (float32 forwards over other batch compositions).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from launch import config
from launch.commands import cli
from launch.errors import UserError
from launch.observe.metric_math import auroc_binary, auroc_ovr_macro, f1_macro
from launch.processes.dist import DistEnv, Runtime
from launch.train.task import Task
from tests import jobs, metric_checks
from tests.helpers import SMALL, output, single
from tests.test_models import train_inproc

FLOAT32_KEYS = ("eval_loss", "eval_mse", "eval_mae")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {1: [{"scenarios": metric_checks.scenarios(Runtime(DistEnv("plain"), torch.device("cpu"), None)), "backend": None}]}
    for ws in (2, 3):
        out[ws] = metric_checks.run(ws, str(tmp_path_factory.mktemp(f"ws{ws}")))
    return out


def _close(key: str, got: float, want: float) -> bool:
    rel = 1e-6 if key in FLOAT32_KEYS else 1e-12
    return got == pytest.approx(want, rel=rel, abs=rel)


def test_metrics_are_the_same_for_world_sizes_1_2_3(results):
    assert all(r["backend"] == "gloo" for ws in (2, 3) for r in results[ws])
    ref = results[1][0]["scenarios"]
    for ws in (2, 3):
        for rank, r in enumerate(results[ws]):
            for name, got in r["scenarios"].items():
                want = ref[name]["record"]
                assert got["keys"] == ref[name]["keys"], (ws, rank, name)
                for key, value in want.items():
                    assert _close(key, got["record"][key], value), (ws, rank, name, key, got["record"][key], value)
    # the stand-in batches of lockstep evaluation (FSDP) add nothing
    for ws in (1, 2, 3):
        for r in results[ws]:
            s = r["scenarios"]
            assert s["classes_lockstep"]["record"] == s["classes"]["record"]


def test_default_records_are_unchanged(results):
    s = results[1][0]["scenarios"]
    assert s["default"]["keys"] == ["eval_loss", "eval_accuracy", "eval_samples"]
    assert s["classes"]["keys"] == ["eval_loss", "eval_accuracy", "eval_top5", "eval_f1_macro", "eval_auroc", "eval_record", "eval_samples"]
    assert s["values"]["keys"] == ["eval_loss", "eval_mse", "eval_mae", "eval_record", "eval_samples"], "auto adds no accuracy to a regression"


# --------------------------------------------------------------------------- the reference


def _pairwise_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(positive scores above negative), ties one half: every (positive, negative) pair compared."""
    p, n = scores[positive], scores[~positive]
    if not len(p) or not len(n):
        return math.nan
    return float(((p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()) / (len(p) * len(n)))


def _f1_macro(pred: np.ndarray, true: np.ndarray) -> float:
    """scikit-learn's f1_score(average='macro'): over the labels in targets or predictions."""
    f1 = []
    for c in np.union1d(pred, true):
        tp, fp, fn = np.sum((pred == c) & (true == c)), np.sum((pred == c) & (true != c)), np.sum((pred != c) & (true == c))
        f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def reference(name: str, out: np.ndarray, y: np.ndarray) -> dict:
    if name == "values":
        return {"eval_mse": float(np.mean((out - y) ** 2)), "eval_mae": float(np.mean(np.abs(out - y))), "eval_record": float(len(y))}
    if name == "labels3":
        pos, logit = y.reshape(-1) > 0.5, out.reshape(-1)
        pred = logit > 0
        return {"eval_accuracy": float(np.mean(pred == pos)), "eval_f1_macro": _f1_macro(pred, pos), "eval_auroc": _pairwise_auroc(logit, pos)}
    logits, labels = out.reshape(-1, out.shape[-1]), y.reshape(-1)
    keep = labels != -100
    logits, labels = logits[keep], labels[keep]
    pred = logits.argmax(axis=1)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    probs = _softmax(logits)
    if logits.shape[1] == 2:
        auroc = _pairwise_auroc(probs[:, 1], labels == 1)
    else:
        per = [_pairwise_auroc(probs[:, c], labels == c) for c in range(logits.shape[1])]
        auroc = float(np.nanmean(per))
    ref = {"eval_accuracy": float(np.mean(pred == labels)), "eval_top5": float(np.mean((top5 == labels[:, None]).any(axis=1))),
           "eval_f1_macro": _f1_macro(pred, labels), "eval_auroc": auroc, "eval_record": float(len(y))}
    if name == "seq":
        right = (out.argmax(axis=-1) == y) | (y == -100)
        ref["eval_exact_match"] = float(right.all(axis=1).mean())
    return ref


def test_metrics_equal_a_reference_on_all_predictions_at_once(results):
    nets = metric_checks.models()
    checked = 0
    for name, (model_name, target_name, *_rest) in metric_checks.SCENARIOS.items():
        x, y = metric_checks.split(target_name)
        with torch.no_grad():
            out = nets[model_name].eval()(x).double().numpy()
        want = reference(target_name, out, y.numpy())
        got = results[1][0]["scenarios"][name]["record"]
        for key, value in got.items():
            if key in want:
                assert _close(key, value, want[key]), (name, key, value, want[key])
                checked += 1
    assert checked >= 25


def test_a_user_metric_gets_every_prediction_once_in_sample_order(results):
    nets = metric_checks.models()
    for name, model_name in (("classes", "classes"), ("values", "values"), ("seq", "seq")):
        x, y = metric_checks.split(model_name)
        with torch.no_grad():
            want = nets[model_name].eval()(x)
        for ws in (1, 2, 3):
            for rank, r in enumerate(results[ws]):
                given = r["scenarios"][name]["given"]
                if rank:
                    assert given == [], "only rank 0 calls the metric function"
                    continue
                assert len(given) == 1, (ws, name)
                preds, targets = given[0]
                assert torch.equal(targets, y), (ws, name, "targets in sample order, each once")
                assert preds.shape == want.shape and torch.allclose(preds, want, rtol=1e-5, atol=1e-6), (ws, name)


# --------------------------------------------------------------------------- the math, with ties and absent classes


def test_auroc_and_f1_against_the_reference_with_ties_and_absent_classes():
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 6, (200,), generator=g).float() / 5  # six score values: many ties
    positive = torch.rand(200, generator=g) < 0.4
    assert auroc_binary(scores, positive) == pytest.approx(_pairwise_auroc(scores.numpy(), positive.numpy()), rel=1e-12)
    assert math.isnan(auroc_binary(scores, torch.zeros(200, dtype=torch.bool))), "no positives: undefined"
    probs = torch.softmax(torch.randn(300, 5, generator=g), dim=1)
    labels = torch.randint(0, 4, (300,), generator=g)  # class 4 never occurs: left out of the macro average
    per = [_pairwise_auroc(probs[:, c].numpy(), (labels == c).numpy()) for c in range(4)]
    assert auroc_ovr_macro(probs, labels) == pytest.approx(float(np.mean(per)), rel=1e-12)
    pred = torch.randint(0, 3, (300,), generator=g)
    counts = [torch.bincount(t, minlength=6) for t in (labels[pred == labels], pred, labels)]
    tp, fp, fn = counts[0], counts[1] - counts[0], counts[2] - counts[0]
    assert f1_macro(tp, fp, fn) == pytest.approx(_f1_macro(pred.numpy(), labels.numpy()), rel=1e-12)


# --------------------------------------------------------------------------- misfits: one line, at start


def _check(loss, metrics, model, x, y, *extra):
    cfg = config.load(None, [f"train.loss={loss}", f"train.metrics={metrics}", "train.device=cpu", *extra])
    task = Task(cfg, model)
    task.check(model, x, y)
    return task


def _cases():
    from launch.models.build import NeuralNetwork
    from tests.user_code import Linear1, OwnLoss, SeqGRU

    torch.manual_seed(0)
    x4 = torch.randn(4, 4)
    tokens = torch.randint(0, 12, (4, 10))
    return {
        "mse on classes": ("cross_entropy", "[mse]", NeuralNetwork(4, [8], 3), x4, torch.tensor([0, 1, 2, 0]), "mse does not fit train.loss=cross_entropy"),
        "accuracy on values": ("mse", "[accuracy]", Linear1(4), x4, torch.randn(4, 1), "accuracy does not fit train.loss=mse"),
        "top5 of 3 classes": ("cross_entropy", "[top5]", NeuralNetwork(4, [8], 3), x4, torch.tensor([0, 1, 2, 0]), "top5 needs more than 5 classes"),
        "auroc per token": ("cross_entropy", "[auroc]", SeqGRU(), tokens, tokens, "auroc per token over 12 classes"),
        "own loss method": ("cross_entropy", "[f1_macro]", OwnLoss(4), x4, torch.randn(4, 1), "a model with a loss(batch) method returns only its loss"),
        "not a number": ("cross_entropy", "[tests.metric_fns:not_a_number]", NeuralNetwork(4, [8], 3), x4, torch.tensor([0, 1, 2, 0]), "must return a number"),
        "raises": ("cross_entropy", "[tests.metric_fns:broken]", NeuralNetwork(4, [8], 3), x4, torch.tensor([0, 1, 2, 0]),
                   "train.metrics 'tests.metric_fns:broken': ValueError: no metric today (at tests/metric_fns.py"),
        "no such function": ("cross_entropy", "[tests.metric_fns:nope]", NeuralNetwork(4, [8], 3), x4, torch.tensor([0, 1, 2, 0]), "module 'tests.metric_fns' has no 'nope'"),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_a_metric_that_does_not_fit_is_one_line(case):
    loss, metrics, model, x, y, needle = _cases()[case]
    with pytest.raises(UserError) as e:
        _check(loss, metrics, model, x, y)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("metrics, needle", [
    ("[f1]", "unknown metric 'f1'"),
    ("[tests.metric_fns:accuracy]", "would be recorded as eval_accuracy"),
    ("[a.b:record,c.d:record]", "would be recorded as eval_record"),
])
def test_bad_metric_names_are_refused_while_reading_the_config(metrics, needle):
    with pytest.raises(UserError, match=needle):
        config.load(None, [f"train.metrics={metrics}"])


def test_a_loss_function_is_scored_by_what_its_targets_are():
    from tests.user_code import Linear1

    task = _check("tests.user_code:squared_error", "[mse,mae]", Linear1(4), torch.randn(4, 4), torch.randn(4, 1))
    assert task.metrics.active == ["mse", "mae"]
    with pytest.raises(UserError, match="accuracy does not fit train.loss=tests.user_code:squared_error"):
        _check("tests.user_code:squared_error", "[accuracy]", Linear1(4), torch.randn(4, 4), torch.randn(4, 1))


def test_a_model_with_its_own_loss_is_scored_by_import_path_metrics_only():
    """model.loss_arg: one forward gives the loss and the logits the metric function reads."""
    from launch.data.feeder import Feeder
    from launch.data.types import Split
    from launch.train.evaluate import evaluate
    from tests import metric_fns
    from tests.user_models import HFLabels, LMConfig, MappingLM

    torch.manual_seed(0)
    model, data = MappingLM(LMConfig()), HFLabels("eval", n=9)
    own = ["model.loss_arg=labels", "model.loss_reduction=mean_shifted"]
    with pytest.raises(UserError, match="accuracy does not fit a model that computes its own loss"):
        _check("cross_entropy", "[accuracy]", model, data.x[:4], data.y[:4], *own)
    cfg = config.load(None, ["train.metrics=[tests.metric_fns:record]", "train.device=cpu", *own])
    task = Task(cfg, model)
    task.check(model, data.x[:4], data.y[:4])
    metric_fns.calls.clear()
    rt = Runtime(DistEnv("plain"), torch.device("cpu"), None)
    record = evaluate(model, task, Feeder(Split(data.x, data.y), cfg, rt.device, 0, 1, 4), rt, cfg)
    assert record["eval_record"] == 9.0 and list(record) == ["eval_loss", "eval_record", "eval_samples"]
    (preds, targets), = metric_fns.calls
    with torch.no_grad():
        assert torch.allclose(preds, model(data.x)["logits"], atol=1e-6) and torch.equal(targets, data.y)


def test_a_sample_shape_that_changes_between_batches_is_one_line():
    from tests.user_code import SeqGRU

    torch.manual_seed(0)
    model, tokens = SeqGRU(), torch.randint(0, 12, (4, 10))
    task = _check("cross_entropy", "[tests.metric_fns:record]", model, tokens, tokens)
    tally = task.metrics.tally(0, 1)
    shorter = tokens[:, :7]
    with pytest.raises(UserError, match=r"the output per sample is \[7, 12\] in this evaluation batch and \[10, 12\] on the first batch"):
        tally.add(task.view(model(shorter), shorter), 0)


def test_a_misfit_stops_the_run_before_anything_is_written(tmp_path):
    p = single(tmp_path / "r", "train.metrics=[auto,mse]", timeout=60)
    assert p.returncode == 2, output(p)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: train.metrics: mse does not fit train.loss=cross_entropy" in lines[0], output(p)
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- a run and launch predict


def predict(capsys, *args) -> tuple[int, str, str]:
    """`launch predict ARGS` through the command's main() in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e, jobs.one_thread():
        cli.main(["predict", *args])
    printed = capsys.readouterr()
    return e.value.code, printed.out, printed.err


def test_a_run_records_the_metrics_and_predict_recomputes_them(tmp_path, capsys):
    """The run, its rerun and `launch predict` in this process (no process boundary under test here;
    the refusal before anything is written is the real command's, above)."""
    run_dir = tmp_path / "r"
    with jobs.one_thread():
        _, _, said = train_inproc(run_dir, *SMALL, "data.classes=7", "train.metrics=[auto,top5,f1_macro,auroc,tests.metric_fns:record]")
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    keys = [k for k in last if k.startswith("eval_")]
    assert keys == ["eval_loss", "eval_accuracy", "eval_top5", "eval_f1_macro", "eval_auroc", "eval_record", "eval_samples"]
    assert last["eval_record"] == 100.0 and 0.5 < last["eval_auroc"] <= 1.0
    assert f"eval_f1_macro {last['eval_f1_macro']:.4f} | eval_auroc" in said, "the epoch line shows them"
    code, out, err = predict(capsys, str(run_dir), "--eval")
    assert code == 0, (out, err)
    got = json.loads(out)
    for key in ("accuracy", "top5", "f1_macro", "auroc", "record"):
        assert got[key] == pytest.approx(last[f"eval_{key}"], rel=1e-6), key
    code, out, err = predict(capsys, str(run_dir), "--eval", "--metrics", "mae")
    assert code == 2 and "mae does not fit" in err, (out, err)
    # train.metrics does not define the run: a rerun may change it (named in one line) and continue
    with jobs.one_thread():
        _, _, again = train_inproc(run_dir, *SMALL, "data.classes=7", "train.epochs=3", "train.metrics=[auto,f1_macro]")
    assert "train.metrics ['auto', 'top5', 'f1_macro', 'auroc', 'tests.metric_fns:record'] -> ['auto', 'f1_macro']" in again, again
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["epoch"] == 2 and [k for k in last if k.startswith("eval_")] == ["eval_loss", "eval_accuracy", "eval_f1_macro", "eval_samples"]
