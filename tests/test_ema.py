"""Issue 19: EMA weights: one process's under DDP and FSDP, bitwise across a stop and a rerun, evaluated
each epoch, and model_ema.pt is what `launch predict` evaluates to eval_loss_ema."""

from __future__ import annotations

import json

import pytest
import torch

from launch.errors import EXIT_STOPPED
from launch.observe.logger import read_metrics
from tests import jobs
from tests.helpers import SMALL, output
from tests.test_models import launch_inproc, max_diff, train_inproc

EMA = [*SMALL, "data.n_train=385", "train.epochs=3", "train.ema_decay=0.9", "train.ema_warmup_steps=5", "train.check_every_steps=2"]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The 2-rank runs on one pair of spawned gloo ranks (tests/jobs.py; each a fresh run, resumed from
    disk): DDP, FSDP, and a DDP run stopped at step 15 and rerun. Returns the directory holding them."""
    base = tmp_path_factory.mktemp("ema_two")
    at = lambda name: f"run.dir={base / name}"  # noqa: E731
    jobs.run_jobs(2, [("ddp", [*EMA, at("ddp")], ""), ("fsdp", [*EMA, "dist.strategy=fsdp", at("fsdp")], ""),
                      ("cut", [*EMA, at("cut")], "stop:step=15"), ("cut", [*EMA, at("cut")], "")], base / "out")
    return base


@pytest.fixture(scope="module")
def ddp_run(two):
    assert jobs.ended(two / "out", "ddp")["ended"] == "done", jobs.log(two / "out", "ddp")
    return two / "ddp"


def test_ema_under_ddp_and_fsdp_equals_one_process_and_predict_reproduces_it(ddp_run, two, tmp_path):
    one, _, _ = train_inproc(tmp_path / "one", *EMA, "data.batch_size=32")
    ema1 = torch.load(tmp_path / "one" / "model_ema.pt", weights_only=True)
    assert max_diff(ema1, torch.load(ddp_run / "model_ema.pt", weights_only=True)) <= 1e-6
    assert max_diff(ema1, torch.load(tmp_path / "one" / "model.pt", weights_only=True)) > 1e-3  # it is not the raw weights
    rec = read_metrics(ddp_run)[-1]
    assert rec["eval_loss_ema"] == pytest.approx(one["eval_loss_ema"], abs=1e-6) and "eval_accuracy_ema" in rec
    p = launch_inproc("predict", ddp_run / "model_ema.pt", "--eval")
    assert p.returncode == 0 and json.loads(p.stdout)["loss"] == pytest.approx(rec["eval_loss_ema"], abs=1e-6), output(p)
    assert jobs.ended(two / "out", "fsdp")["ended"] == "done", jobs.log(two / "out", "fsdp")
    assert max_diff(ema1, torch.load(two / "fsdp" / "model_ema.pt", weights_only=True)) <= 1e-6


def test_ema_resumes_bitwise_after_a_stop(ddp_run, two):
    out = two / "out"
    stopped = jobs.ended(out, "cut")
    assert stopped["ended"] == "stopped" and stopped["code"] == EXIT_STOPPED == 75, jobs.log(out, "cut")
    again = jobs.log(out, "cut", attempt=2)
    assert jobs.ended(out, "cut", attempt=2)["ended"] == "done" and "resumed from" in again, again
    a, b = (torch.load(d / "model_ema.pt", weights_only=True) for d in (ddp_run, two / "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(ddp_run)[-1]["eval_loss_ema"] == read_metrics(two / "cut")[-1]["eval_loss_ema"]
