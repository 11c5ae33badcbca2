"""Issue 12: bad inputs that used to escape, one writer per run directory, no orphaned workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from launch import checkpoint
from tests.helpers import PY, ROOT, SMALL, TORCHRUN, env, output, run

LONG = ["data.n_train=20000", "train.epochs=50", "log.every_steps=5", "ckpt.every_steps=50"]


def one_line_exit_2(p, needle: str) -> str:
    assert p.returncode == 2, output(p)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], output(p)
    assert p.wall < 15, f"took {p.wall:.1f}s"
    return lines[0]


# --------------------------------------------------------------------------- bad inputs


def _yaml(tmp_path, name: str, text: str) -> str:
    f = tmp_path / name
    f.write_text(text)
    return str(f)


@pytest.mark.parametrize("case", ["run.dir is a file", "run.dir under a file", "run.dir cannot be created", "key twice", "nan", "inf"])
def test_bad_input_classes_are_one_line_before_anything_is_written(tmp_path, case):
    (tmp_path / "afile").write_text("not a directory")
    run_dir, extra, needle = tmp_path / "run", [], ""
    if case == "run.dir is a file":
        run_dir, needle = tmp_path / "afile", "exists and is a file"
    elif case == "run.dir under a file":
        run_dir, needle = tmp_path / "afile" / "run", "is a file, not a directory"
    elif case == "run.dir cannot be created":
        if not sys.platform.startswith("linux"):
            pytest.skip("uses /proc, where nobody (not even root) can create a directory")
        run_dir, needle = "/proc/launch-test-run", "cannot be created under /proc"
    elif case == "key twice":
        extra, needle = ["--config", _yaml(tmp_path, "twice.yaml", "train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")], "key 'lr' is given twice in one mapping (lines 2 and 4)"
    elif case == "nan":
        extra, needle = ["--config", _yaml(tmp_path, "nan.yaml", "train:\n  lr: .nan\n")], "train.lr: expected a finite number, got nan"
    else:
        extra, needle = ["--config", _yaml(tmp_path, "inf.yaml", "dist:\n  timeout_s: .inf\n")], "dist.timeout_s: expected a finite number, got inf"
    before = sorted(p.name for p in tmp_path.iterdir())
    p = run([PY, "train_single.py", *extra, *SMALL, f"run.dir={run_dir}"], timeout=60)
    one_line_exit_2(p, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing may be written"


@pytest.mark.parametrize("setting, needle", [
    ("model.name=tests.user_code_broken:BrokenNet", "ValueError: the model cannot be built (at tests/user_code_broken.py:10 in __init__)"),
    ("data.name=tests.user_code_broken:BrokenData", "ZeroDivisionError: division by zero (at tests/user_code_broken.py:15 in __init__)"),
    ("model.name=tests.user_code_import_error:Net", "importing module 'tests.user_code_import_error' failed: ValueError: math domain error (at tests/user_code_import_error.py:5 in <module>)"),
])
def test_failing_user_code_is_one_line_naming_the_place(tmp_path, setting, needle):
    p = run([PY, "train_single.py", *SMALL, setting, f"run.dir={tmp_path / 'run'}"], timeout=60)
    line = one_line_exit_2(p, needle)
    assert setting.split("=")[1].split(":")[0] in line and "log.debug=true" in line
    debug = run([PY, "train_single.py", *SMALL, setting, "log.debug=true", f"run.dir={tmp_path / 'run'}"], timeout=60)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr, output(debug)
    assert needle.split(" (at")[0] in debug.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- one writer per run directory


def wait_for(predicate, proc, what: str, deadline_s: float = 90):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"the job ended (exit {proc.returncode}) before {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def step_records(run_dir):
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if '"train_loss_step"' in line]


def snapshot(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_second_job_on_a_live_run_directory_is_refused_and_touches_nothing(tmp_path):
    cmd = [PY, "train_single.py", *SMALL, *LONG, f"run.dir={tmp_path}"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: step_records(tmp_path), first, "the first job's first step record")
        first.send_signal(signal.SIGSTOP)  # hold it still, so any change to its files would be the second job's
        before = snapshot(tmp_path)
        second = run(cmd, timeout=60)
        line = one_line_exit_2(second, "is in use by a live job")
        assert f"pid {first.pid}" in line and "host " in line
        assert snapshot(tmp_path) == before, "the second job must not write into the live run directory"
        first.send_signal(signal.SIGCONT)
        (tmp_path / "STOP").touch()
        _, err = first.communicate(timeout=90)
        assert first.returncode == 75, err
    finally:
        first.kill()


# --------------------------------------------------------------------------- no orphans


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux-only")
def test_workers_die_with_a_killed_torchrun_agent_and_a_rerun_resumes(tmp_path):
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "train_ddp.py", *SMALL, *LONG, f"run.dir={tmp_path}"]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        wait_for(lambda: checkpoint.read_latest(tmp_path / "checkpoints"), agent, "the first checkpoint")
        workers = [c for c in psutil.Process(agent.pid).children(recursive=True) if "train_ddp.py" in " ".join(c.cmdline())]
        assert len(workers) == 2
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive, f"orphaned workers still running 5 s after the agent died: {[p.pid for p in alive]}"
    finally:
        for p in [agent, *workers]:
            try:
                p.kill()
            except (OSError, psutil.Error):
                pass
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    quiet_until = time.monotonic() + 1.0  # waiting for an absence: nothing may write any more
    while time.monotonic() < quiet_until:
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == files, "a checkpoint appeared after the workers died"
        time.sleep(0.1)
    latest = checkpoint.read_latest(tmp_path / "checkpoints")
    step = checkpoint.load(tmp_path / "checkpoints" / latest)["step"]
    # The whole job is dead: rerun the same command (shorter) and it resumes, no lock or file in the way.
    again = run([*cmd[:-5], "data.n_train=20000", "train.epochs=1", "log.every_steps=5", "ckpt.every_steps=50", f"run.dir={tmp_path}"], timeout=180)
    assert again.returncode == 0, output(again)
    assert f"step {step})" in again.stdout and "resumed from" in again.stdout
