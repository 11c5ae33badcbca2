"""Issue 17: a stop on purpose is a stop: never restarted by torchrun, told apart from a finish and
from a failure, and its line names what really caused it. Issue 22: the line says what the job exits
with under the launcher in use, and that is what it exits with."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest

from launch.checkpoint import store
from launch.errors import EXIT_NONFINITE, EXIT_STOPPED
from launch.processes.stopping import Stopped, as_launcher_ends_it
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
    assert m and "(the workers exit 0 under torchrun, which would restart them otherwise, and so does torchrun;" in err, err
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
    m = re.search(r"stopped by SIGTERM \(on 1 of 2 ranks\) at step (\d+).* \(exit 75\)$", err, re.M)
    assert m and "stop file" not in err, err
    assert (tmp_path / "run" / "STOPPED").exists()
    # one more step is enough to see the next run clear STOPPED
    again = subprocess.run([*args, f"train.max_steps={int(m.group(1)) + 1}"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and not (tmp_path / "run" / "STOPPED").exists(), again.stderr


def test_sigusr1_to_the_nproc_parent_stops_with_the_exit_code_the_line_names(tmp_path):
    """The `--nproc` parent passes SIGUSR1 on to its workers, as SIGTERM and SIGINT (it used to die of
    it, taking them along, nothing saved), and exits 75 with them, as the line says. (SIGTERM to
    torchrun itself: tests/test_failures.py, exit 1 as its line says.)"""
    proc = start_training([PY, "train_ddp.py", "--nproc", "2", *LONG, f"run.dir={tmp_path}"], tmp_path)
    try:
        wait_for_step(tmp_path, proc)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # the parent signals its workers one after the other: a rank may agree on the stop before the other got it
    said = re.search(r"^stopped by SIGUSR1( \(on 1 of 2 ranks\))? at step \d+ .*\(exit (\d+)\)$", err, re.M)
    assert said and proc.returncode == int(said.group(2)) == EXIT_STOPPED, err
    assert (tmp_path / "STOPPED").read_text().strip() in said.group(0)  # the stop is recorded, in the same words


@pytest.mark.parametrize("launcher, signals, code, says", [
    ("plain", ("SIGINT",), EXIT_STOPPED, "resume (exit 75)"),
    ("spawn", ("SIGUSR1",), EXIT_STOPPED, "resume (exit 75)"),
    ("slurm", (), EXIT_STOPPED, "resume (exit 75)"),  # srun exits with its tasks' highest code (measured: 75)
    ("torchrun", (), 0, "otherwise, and so does torchrun; /r/STOPPED records the stop)"),
    ("torchrun", ("SIGUSR1",), 0, "and so does torchrun;"),  # torchrun dies of a SIGUSR1 of its own: this one went to the workers
    ("torchrun", ("SIGTERM", "SIGINT"), 0, "torchrun itself exits 1 if the SIGTERM or SIGINT reached it, 0 if only its workers got it;"),
])
def test_the_stop_line_names_each_launchers_exit(launcher, signals, code, says):
    e = as_launcher_ends_it(Stopped("stopped by X at step 3 (mid-epoch 0); checkpoint saved, rerun the same command to resume", EXIT_STOPPED, signals), launcher, Path("/r"))
    assert e.code == code and says in str(e), str(e)
    assert as_launcher_ends_it(Stopped("non-finite loss", EXIT_NONFINITE), launcher, Path("/r")).code == EXIT_NONFINITE  # not a stop on purpose


def test_the_stop_line_in_a_kubeflow_pod_names_exit_75(monkeypatch):
    """In a TrainJob pod Kubernetes restarts the container, not torchrun: a stop leaves it 75."""
    monkeypatch.setenv("PET_NNODES", "2")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    e = as_launcher_ends_it(Stopped("stopped by SIGTERM at step 3 (mid-epoch 0); checkpoint saved", EXIT_STOPPED, ("SIGTERM",)), "torchrun", Path("/r"))
    assert e.code == EXIT_STOPPED and "(exit 75: in a Kubeflow TrainJob pod" in str(e), str(e)
