"""Issue 17: changing settings on a resume (applied and named, or refused as another run), and a run
directory removed or replaced under a live job."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import time

import pytest
import torch

from launch import config
from launch.checkpoint import store
from launch.errors import EXIT_NONFINITE, UserError
from launch.observe.logger import read_metrics
from launch.processes.dist import DistEnv, setup
from launch.processes.stopping import Stopped
from launch.train.loop import train
from tests.helpers import PY, ROOT, SMALL, env
from tests.test_failures import wait_for_step


def train_inproc(run_dir, *overrides):
    cfg = config.load(None, [*SMALL, f"run.dir={run_dir}", *overrides])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train(cfg, setup(cfg, DistEnv("plain")))
    return result, out.getvalue()


def final_state(run_dir) -> dict:
    ckdir = store.checkpoint_dir(run_dir)
    return store.load(ckdir / store.read_latest(ckdir))


def test_after_a_nan_a_lower_lr_resumes_from_the_last_good_checkpoint_and_is_used(tmp_path, monkeypatch):
    """The exit-3 advice, followed: lower the LR and rerun."""
    monkeypatch.setenv("LAUNCH_FAULT", "nan:step=6")
    with pytest.raises(Stopped) as e:
        train_inproc(tmp_path, "ckpt.every_steps=4", "train.check_every_steps=4")
    assert e.value.code == EXIT_NONFINITE and "lower train.lr" in str(e.value)
    monkeypatch.delenv("LAUNCH_FAULT")
    _, out = train_inproc(tmp_path, "ckpt.every_steps=4", "train.check_every_steps=4", "train.lr=0.05")
    assert "resumed from" in out and "(epoch 0, step 4)" in out, out
    assert "changed on resume at step 4: train.lr 0.1 -> 0.05" in out
    assert "the learning rate at step 4 is now 0.05 (was 0.1)" in out
    state = final_state(tmp_path)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.05] and state["config"]["train"]["lr"] == 0.05
    assert all(r["lr"] == 0.05 for r in read_metrics(tmp_path))
    kept = list((tmp_path / "config-history").glob("config.before-step_00000004.yaml"))
    assert len(kept) == 1 and "lr: 0.1" in kept[0].read_text()


def test_a_checkpoint_path_with_a_new_lr_trains_with_the_new_lr(tmp_path):
    train_inproc(tmp_path / "a", "train.epochs=1")
    start = tmp_path / "a" / "checkpoints" / store.read_latest(tmp_path / "a" / "checkpoints")
    _, out = train_inproc(tmp_path / "b", f"ckpt.resume={start}", "train.lr=0.01", "train.epochs=2")
    assert "changed on resume at step 24: train.lr 0.1 -> 0.01" in out, out
    state = final_state(tmp_path / "b")
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.01]
    assert read_metrics(tmp_path / "b")[-1]["lr"] == 0.01


def test_extending_a_cosine_schedule_says_what_it_does_to_the_lr(tmp_path):
    train_inproc(tmp_path, "train.epochs=1", "train.schedule=cosine")
    _, out = train_inproc(tmp_path, "train.epochs=2", "train.schedule=cosine")
    assert "changed on resume at step 24: train.epochs 1 -> 2" in out
    assert "the learning rate at step 24 is now 0.05 (was 0)" in out, out


def test_settings_that_define_the_run_are_refused_naming_them(tmp_path):
    train_inproc(tmp_path, "train.epochs=1")
    before = sorted(p.name for p in store.checkpoint_dir(tmp_path).iterdir())
    with pytest.raises(UserError) as e:
        train_inproc(tmp_path, "train.epochs=2", "train.seed=7", "train.lr=0.3")
    assert "train.seed: 0 -> 7" in str(e.value) and "train.lr" not in str(e.value) and "define the run" in str(e.value)
    assert sorted(p.name for p in store.checkpoint_dir(tmp_path).iterdir()) == before


def remove_under_writer(path, deadline_s: float = 90) -> None:
    """rm -rf of a directory a live job writes into can meet a file the job made after it listed the
    directory ("Directory not empty", as GNU rm says too): repeat it, as its user would, until the path
    is gone. The job stops writing at its next agreement once its .lock is gone, so this ends."""
    deadline = time.monotonic() + deadline_s
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        assert time.monotonic() < deadline, f"{path} could not be removed: {sorted(p.name for p in path.iterdir())}"


def test_a_run_directory_replaced_under_a_live_job_stops_it_and_the_new_job_is_alone(tmp_path):
    """rm -rf of A's run directory and a job B with another LR started there: A stops at its next
    agreement with one line and writes nothing more; B starts fresh and everything there is B's."""
    run_dir = tmp_path / "run"
    long = [*SMALL, "data.n_train=20000", "train.epochs=50", "train.check_every_steps=5", "log.every_steps=5"]
    a = subprocess.Popen([PY, "train_single.py", *long, f"run.dir={run_dir}"], cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(run_dir, a)
        remove_under_writer(run_dir)
        b = subprocess.run([PY, "train_single.py", *SMALL, f"run.dir={run_dir}", "train.lr=0.05", "train.epochs=1"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
        _, err = a.communicate(timeout=120)
    finally:
        a.kill()
    assert a.returncode == 2 and "was removed or replaced while this job ran" in err and len(err.strip().splitlines()) == 1, err
    assert b.returncode == 0 and "resumed from" not in b.stdout, b.stdout + b.stderr
    records = read_metrics(run_dir)
    assert records and all(r["lr"] == 0.05 for r in records)
    for f in store.checkpoint_dir(run_dir).glob("step_*.pt"):
        assert store.load(f)["config"]["train"]["lr"] == 0.05


def test_a_save_into_a_removed_run_directory_does_not_make_it_again(tmp_path):
    """The window between a save's check that the run directory is still this job's and its write:
    the save fails with one line instead of creating the directory for the next job there to resume."""
    run_dir = tmp_path / "gone"
    with pytest.raises(UserError) as e:
        store.save({"model": {"w": torch.zeros(2)}, "step": 4}, run_dir, 4, keep_last=2)
    assert not run_dir.exists() and "cannot write checkpoint" in str(e.value) and "\n" not in str(e.value), str(e.value)
