"""The shipped examples (issue 11): the tiny transformer on generated sums and the diabetes regression.
Shortened settings keep them to seconds; the full configs' numbers are in the README."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from launch import config
from launch.processes.dist import DistEnv, setup
from launch.processes.stopping import Stopped
from launch.train.loop import train
from tests import jobs
from tests.test_recipes import recipe_overrides

# configs/sums_lm.yaml, smaller: 1500 training sums, 2 epochs, no progress bar, on the CPU
SUMS = ["data.kwargs={n: 1500, n_eval: 301, digits: 2, seed: 0}", "train.epochs=2", "train.warmup_steps=5", "train.device=cpu", "log.progress=false"]


def train_config(path, run_dir, *overrides):
    """A config file trained in this process, on one thread (as the shared ranks run)."""
    cfg = config.load(path, [f"run.dir={run_dir}", *overrides])
    with contextlib.redirect_stdout(io.StringIO()), jobs.one_thread():
        result = train(cfg, setup(cfg, DistEnv("plain")))
    return result, torch.load(run_dir / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def sums_one(tmp_path_factory):
    """The shortened configs/sums_lm.yaml, one process at its batch of 64, uninterrupted: the reference
    of the resume test and of the DDP test."""
    return train_config("configs/sums_lm.yaml", tmp_path_factory.mktemp("sums_one"), *SUMS)


def test_transformer_example_resumes_bitwise(sums_one, tmp_path, monkeypatch):
    ref, wref = sums_one
    monkeypatch.setenv("LAUNCH_FAULT", "stop:step=30")  # 24 steps per epoch: mid-epoch 1
    with pytest.raises(Stopped, match="mid-epoch 1"):
        train_config("configs/sums_lm.yaml", tmp_path / "run", *SUMS)
    monkeypatch.delenv("LAUNCH_FAULT")
    again, wagain = train_config("configs/sums_lm.yaml", tmp_path / "run", *SUMS)
    for k in wref:
        assert torch.equal(wref[k], wagain[k]), k
    assert again["eval_loss"] == ref["eval_loss"] and again["eval_accuracy"] == ref["eval_accuracy"]


def test_transformer_example_ddp_equals_one_process(sums_one, tmp_path):
    """2 processes x batch 32 (two shared gloo ranks, tests/jobs.py) against one at 64, with the
    config's own AdamW, cosine schedule and ignored prompt tokens. (With a key bias, whose gradient is
    zero in exact arithmetic, AdamW amplified rounding noise to 9e-5; TinyGPT has none, and the runs
    agree to about 2e-7.)"""
    one, w1 = sums_one
    jobs.run_jobs(2, [("two", [*recipe_overrides("sums_lm"), *SUMS, "data.batch_size=32", f"run.dir={tmp_path / 'two'}"], "")], tmp_path / "out")
    assert jobs.ended(tmp_path / "out", "two")["ended"] == "done", jobs.log(tmp_path / "out", "two")
    w2 = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-5
    assert "eval_accuracy" in one and one["eval_samples"] == 301


def test_diabetes_regression_learns(tmp_path):
    result, _ = train_config("configs/diabetes.yaml", tmp_path, "train.device=cpu")
    assert "eval_accuracy" not in result
    assert result["eval_loss"] < 4500, result  # predicting the training mean: about 7270 on this split
