"""Issue 19: EMA weights: one process's under DDP and FSDP, bitwise across a stop and a rerun, evaluated
each epoch, and model_ema.pt is what `launch predict` evaluates to eval_loss_ema."""

from __future__ import annotations

import json

import pytest
import torch

from launch.observe.logger import read_metrics
from tests.helpers import PY, SMALL, output, run
from tests.test_models import max_diff, spawn, train_inproc

EMA = [*SMALL, "data.n_train=385", "train.epochs=3", "train.ema_decay=0.9", "train.ema_warmup_steps=5", "train.check_every_steps=2"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ema_ddp")
    p = spawn(2, d, *EMA)
    assert p.returncode == 0, output(p)
    return d


def test_ema_under_ddp_and_fsdp_equals_one_process_and_predict_reproduces_it(ddp_run, tmp_path):
    one, _, _ = train_inproc(tmp_path / "one", *EMA, "data.batch_size=32")
    ema1 = torch.load(tmp_path / "one" / "model_ema.pt", weights_only=True)
    assert max_diff(ema1, torch.load(ddp_run / "model_ema.pt", weights_only=True)) <= 1e-6
    assert max_diff(ema1, torch.load(tmp_path / "one" / "model.pt", weights_only=True)) > 1e-3  # it is not the raw weights
    rec = read_metrics(ddp_run)[-1]
    assert rec["eval_loss_ema"] == pytest.approx(one["eval_loss_ema"], abs=1e-6) and "eval_accuracy_ema" in rec
    p = run([PY, "-m", "launch", "predict", str(ddp_run / "model_ema.pt"), "--eval"])
    assert p.returncode == 0 and json.loads(p.stdout)["loss"] == pytest.approx(rec["eval_loss_ema"], abs=1e-6), output(p)
    f = spawn(2, tmp_path / "fsdp", *EMA, "dist.strategy=fsdp")
    assert f.returncode == 0, output(f)
    assert max_diff(ema1, torch.load(tmp_path / "fsdp" / "model_ema.pt", weights_only=True)) <= 1e-6


def test_ema_resumes_bitwise_after_a_stop(ddp_run, tmp_path):
    stopped = spawn(2, tmp_path, *EMA, LAUNCH_FAULT="stop:step=15")
    assert stopped.returncode == 75, output(stopped)
    again = spawn(2, tmp_path, *EMA)
    assert again.returncode == 0 and "resumed from" in again.stdout, output(again)
    a, b = (torch.load(d / "model_ema.pt", weights_only=True) for d in (ddp_run, tmp_path))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(ddp_run)[-1]["eval_loss_ema"] == read_metrics(tmp_path)[-1]["eval_loss_ema"]
