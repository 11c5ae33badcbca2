"""Issue 17: a stop on purpose is a stop: never restarted by torchrun, told apart from a finish and
from a failure, and its line names what really caused it."""

from __future__ import annotations

import re
import signal
import subprocess

from launch.checkpoint import store
from launch.errors import EXIT_STOPPED
from tests.helpers import PY, ROOT, SMALL, TORCHRUN, env, wait_for
from tests.test_failures import start_training, wait_for_step

LONG = [*SMALL, "data.n_train=20000", "train.epochs=50", "train.check_every_steps=5", "log.every_steps=5"]


def test_a_stop_file_under_torchrun_max_restarts_is_not_restarted(tmp_path):
    """torchrun restarts any worker that exits non-zero: a stop there exits 0, and STOPPED in the run
    directory tells it from a finish. (Where the launcher owns the exit code, a stop is 75.)"""
    args = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=2", "train_ddp.py", *LONG, f"run.dir={tmp_path}"]
    proc = start_training(args, tmp_path)
    try:
        wait_for_step(tmp_path, proc)
        (tmp_path / "STOP").touch()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "torchrun restart" not in out and "resumed from" not in out, out
    m = re.search(r"stopped by stop file \S+ at step (\d+)", err)
    assert m and "exit 0 under torchrun" in err, err
    assert (tmp_path / "STOPPED").read_text().startswith(f"stopped by stop file {tmp_path / 'STOP'} at step {m.group(1)}")
    assert store.load(tmp_path / "checkpoints" / store.read_latest(tmp_path / "checkpoints"))["step"] == int(m.group(1))
    assert not (tmp_path / "STOP").exists()


def test_a_signal_to_one_rank_is_named_as_that_signal_on_that_many_ranks(tmp_path):
    """SIGTERM to rank 1 alone (a node's OOM killer or an admin): every rank agrees to stop, and the
    line says SIGTERM on 1 of 2 ranks, not a stop file that never existed. The next run clears STOPPED."""
    log = tmp_path / "out.txt"
    args = [PY, "train_ddp.py", "--nproc", "2", *LONG, f"run.dir={tmp_path / 'run'}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=out, stderr=subprocess.PIPE, text=True)
        try:
            pid = int(wait_for("rank 1's line", lambda: re.search(r"rank=1 .* pid=(\d+)", log.read_text()), proc).group(1))
            wait_for_step(tmp_path / "run", proc)
            subprocess.run(["kill", "-TERM", str(pid)], check=True)
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == EXIT_STOPPED, err
    m = re.search(r"stopped by SIGTERM \(on 1 of 2 ranks\) at step (\d+)", err)
    assert m and "stop file" not in err, err
    assert (tmp_path / "run" / "STOPPED").exists()
    # one more step is enough to see the next run clear STOPPED
    again = subprocess.run([*args, f"train.max_steps={int(m.group(1)) + 1}"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and not (tmp_path / "run" / "STOPPED").exists(), again.stderr
