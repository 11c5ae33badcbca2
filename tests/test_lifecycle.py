"""A job's life around its run directory: workers die with their launcher, one writer per run
directory, a rerun after kill -9 resumes with no cleanup, and user code that fails is one line.

Every wait is for an observable event (a file, a process state) with a generous deadline. To kill
a job at a known point whatever the machine's speed, its save at step 8 stalls between writing the
temporary file and renaming it (LAUNCH_FAULT=stall_save): once that file exists, the job is alive
and stays where it is. The rerun is the same command without the fault.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from launch.checkpoint import store
from launch.errors import EXIT_STOPPED
from tests.helpers import PY, ROOT, SMALL, TORCHRUN, env, output, run, wait_for

STALL = "stall_save:step=8:seconds=600"


def start(args, tmp_path, **extra_env) -> subprocess.Popen:
    """Output to files, not pipes: an orphan holding a pipe open must not hang the test."""
    out, err = open(tmp_path / "job.out", "w"), open(tmp_path / "job.err", "w")
    return subprocess.Popen(args, cwd=ROOT, env=env(**extra_env), stdout=out, stderr=err, text=True)


def stalled_save(run_dir: Path):
    """The temporary file of the step-8 checkpoint: rank 0 sleeps right after writing it."""
    return lambda: sorted((run_dir / "checkpoints").glob(".step_00000008.pt.tmp-*"))


def alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def checkpoint_files(run_dir: Path) -> list[str]:
    ckdir = run_dir / "checkpoints"
    return sorted(p.name for p in ckdir.iterdir()) if ckdir.exists() else []


# --------------------------------------------------------------------------- orphans


def launcher_workers(pid: int) -> list[psutil.Process]:
    """torchrun's workers are its children; --nproc's are forked by its forkserver, a child of the launcher."""
    kids = psutil.Process(pid).children()
    servers = [c for c in kids if any("forkserver" in a for a in c.cmdline())]
    return [c for c in kids if any("train_ddp.py" in a for a in c.cmdline())] + [w for s in servers for w in s.children()]


@pytest.mark.parametrize("launcher", ["torchrun", "spawn"])
def test_kill_9_of_the_launcher_takes_its_workers_down_and_a_rerun_resumes(tmp_path, launcher):
    head = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "train_ddp.py"] if launcher == "torchrun" else [PY, "train_ddp.py", "--nproc", "2"]
    run_dir = tmp_path / "run"
    args = [*head, *SMALL, f"run.dir={run_dir}", "ckpt.every_steps=4"]
    proc = start(args, tmp_path, LAUNCH_FAULT=STALL)
    workers: list[psutil.Process] = []
    try:
        tmp = wait_for("the stalled save at step 8", stalled_save(run_dir), proc)
        workers = launcher_workers(proc.pid)
        assert len(workers) == 2, [c.cmdline() for c in psutil.Process(proc.pid).children(recursive=True)]
        writer = int(tmp[0].name.rsplit("-", 1)[1])
        assert writer in {w.pid for w in workers}, "rank 0 is a worker of the launcher"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [w.pid for w in workers if alive(w)]
        assert not survivors, f"workers {survivors} outlived kill -9 of their {launcher} parent"
    finally:  # whatever happened above, leave no process behind
        proc.kill()
        proc.wait()
        for w in workers:
            if alive(w):
                w.kill()
    # the job really was cut, and nothing writes into the run directory any more
    assert not (run_dir / "model.pt").exists() and "done:" not in (tmp_path / "job.out").read_text()
    after = checkpoint_files(run_dir)
    assert "step_00000004.pt" in after and "step_00000008.pt" not in after, after
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2:  # waiting for an absence: nothing may appear
        assert checkpoint_files(run_dir) == after
        time.sleep(0.1)
    # the same command again, with no manual cleanup: the dead job's lock and temporary file are no obstacle
    again = run(args, timeout=240)
    assert again.returncode == 0, output(again)
    assert "resumed from" in again.stdout and "step 4)" in again.stdout, output(again)
    assert (run_dir / "model.pt").exists()
    assert not list((run_dir / "checkpoints").glob(".*.tmp-*"))


# --------------------------------------------------------------------------- one writer per run directory


def _snapshot(run_dir: Path) -> dict:
    return {
        "config": ((run_dir / "config.yaml").read_bytes(), (run_dir / "config.yaml").stat().st_mtime_ns),
        "lock": (run_dir / ".lock").read_text(),
        "metrics": (run_dir / "metrics.jsonl").read_text() if (run_dir / "metrics.jsonl").exists() else "",
        "entries": sorted(p.name for p in run_dir.iterdir() if p.name not in ("metrics.jsonl",)),
    }


def test_a_second_job_on_a_live_run_directory_is_refused_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    # many epochs: job 1 is still training when job 2 has come and gone (it is stopped below)
    args = [PY, "train_single.py", *SMALL, f"run.dir={run_dir}", "data.n_train=20000", "train.epochs=1000",
            "ckpt.every_steps=50", "log.every_steps=10", "train.check_every_steps=1"]
    job1 = start(args, tmp_path)
    try:
        wait_for("job 1's first checkpoint", lambda: store.read_latest(run_dir / "checkpoints"), job1)
        before = _snapshot(run_dir)
        job2 = run(args, timeout=120)
        assert job1.poll() is None, "job 1 must still be running for this test to mean anything"
        assert job2.returncode == 2, output(job2)
        lines = job2.stderr.strip().splitlines()
        assert len(lines) == 1, output(job2)
        assert f"run directory {run_dir} is in use by a live job (host {socket.gethostname()}, pid {job1.pid}, since " in lines[0], output(job2)
        assert job2.wall < 60, f"took {job2.wall:.1f}s"
        after = _snapshot(run_dir)
        assert after["config"] == before["config"] and after["lock"] == before["lock"]
        assert after["metrics"].startswith(before["metrics"]), "job 2 must not truncate job 1's metrics"
        assert not [e for e in after["entries"] if e.startswith("checkpoints.old")]
        assert {t.name.rsplit("-", 1)[1] for t in (run_dir / "checkpoints").glob(".*.tmp-*")} <= {str(job1.pid)}
        (run_dir / "STOP").touch()
        assert job1.wait(timeout=120) == EXIT_STOPPED, (tmp_path / "job.err").read_text()
    finally:
        job1.kill()
    assert "stopped by stop file" in (tmp_path / "job.err").read_text()


def test_kill_9_of_a_single_process_job_then_the_same_command_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [PY, "train_single.py", *SMALL, f"run.dir={run_dir}", "ckpt.every_steps=4"]
    proc = start(args, tmp_path, LAUNCH_FAULT=STALL)
    try:
        wait_for("the stalled save at step 8", stalled_save(run_dir), proc)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    assert (run_dir / ".lock").read_text().split()[1] == str(proc.pid), "the dead job's lock file stays; its flock does not"
    again = run(args, timeout=120)
    assert again.returncode == 0, output(again)
    assert "resumed from" in again.stdout and "step 4)" in again.stdout, output(again)
    assert (run_dir / ".lock").read_text().split()[1] != str(proc.pid)


def _unwritable_dir(tmp_path: Path):
    """A directory this process cannot create entries in: a chmod 0o555 one, or (as root, where
    permissions are not enforced) a read-only place such as /proc/sys."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for candidate in (ro, Path("/proc/sys")):
        if candidate.is_dir() and not os.access(candidate, os.W_OK):
            return candidate
    pytest.skip("no directory here is unwritable for this user (root without a read-only mount)")


@pytest.mark.parametrize("case", ["file", "file as parent", "unwritable"])
def test_an_unusable_run_dir_is_one_line_and_creates_nothing(tmp_path, case):
    target = tmp_path / "taken"
    target.write_text("not a directory\n")
    if case == "file":
        run_dir, needle = target, f"run.dir {target} exists and is a file"
    elif case == "file as parent":
        run_dir, needle = target / "run", f"{target} is not a directory"
    else:
        parent = _unwritable_dir(tmp_path)
        run_dir, needle = parent / "launch-test-run" / "x", f"cannot create {parent / 'launch-test-run' / 'x'} under {parent} ("
    p = run([PY, "train_single.py", *SMALL, f"run.dir={run_dir}"], timeout=60)
    assert p.returncode == 2, output(p)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], output(p)
    assert p.wall < 30, f"took {p.wall:.1f}s"
    assert target.read_text() == "not a directory\n"
    if case == "unwritable":
        assert not (run_dir.parent).exists()
        (tmp_path / "ro").chmod(0o755)


# --------------------------------------------------------------------------- user code that fails


def _line_of(path: Path, marker: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if marker in line)


BROKEN = ROOT / "tests" / "user_code_broken.py"
IMPORT_ERROR = ROOT / "tests" / "user_code_import_error.py"
USER_CASES = {
    "model init raises": (["model.name=tests.user_code_broken:BrokenNet"],
                          ["model.name 'tests.user_code_broken:BrokenNet'", "ZeroDivisionError: division by zero",
                           f"tests/user_code_broken.py:{_line_of(BROKEN, 'width / 0')} in _scale"]),
    "dataset init raises": (["data.name=tests.user_code_broken:BrokenData"],
                            ["data.name 'tests.user_code_broken:BrokenData'", "FileNotFoundError: no such shard: /data/train-10.bin",
                             f"tests/user_code_broken.py:{_line_of(BROKEN, 'raise FileNotFoundError')} in __init__"]),
    "module raises at import": (["model.name=tests.user_code_import_error:Net"],
                                ["importing module 'tests.user_code_import_error' raised NameError: name 'undefined_factor' is not defined",
                                 f"tests/user_code_import_error.py:{_line_of(IMPORT_ERROR, 'undefined_factor')} in <module>"]),
    "bad model.kwargs": (["model.name=tests.user_code_broken:StrictNet", "model.kwargs={depth: 3}"],
                         ["model.name 'tests.user_code_broken:StrictNet': TypeError:", "unexpected keyword argument 'depth'", "check model.kwargs"]),
}


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("case", list(USER_CASES))
def test_failing_user_code_is_one_line_naming_the_users_file(tmp_path, case, debug):
    overrides, needles = USER_CASES[case]
    p = run([PY, "train_single.py", *SMALL, f"run.dir={tmp_path / 'run'}", *overrides, f"log.debug={str(debug).lower()}"], timeout=60)
    assert p.returncode == 2, output(p)
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and all(n in lines[-1] for n in needles), output(p)
    if debug:
        assert lines[0] == "Traceback (most recent call last):" and len(lines) > 3, output(p)
    else:
        assert len(lines) == 1, output(p)
    assert not (tmp_path / "run").exists()


def test_a_syntax_error_in_the_users_module_names_its_line(tmp_path):
    pkg = tmp_path / "mine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "net.py").write_text("from torch import nn\n\n\nclass Net(nn.Module)\n    pass\n")
    p = run([PY, "train_single.py", *SMALL, f"run.dir={tmp_path / 'run'}", "model.name=mine.net:Net"], timeout=60,
            PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    assert p.returncode == 2, output(p)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "importing module 'mine.net' raised SyntaxError:" in lines[0], output(p)
    assert f"{pkg / 'net.py'}:4)" in lines[0], output(p)
    assert not (tmp_path / "run").exists()


def test_a_worker_whose_launcher_is_already_gone_stops_at_once():
    """The race die_with_parent closes: the parent died before the prctl, so no signal will come."""
    code = "from launch.processes import lifeline; lifeline.die_with_parent(); print('still here')"
    p = run([PY, "-c", code], timeout=60, LAUNCH_PARENT_PID="1")  # pid 1 is not this process's parent
    if os.getppid() == 1 or psutil.Process().ppid() == 1:
        pytest.skip("this test process runs as a child of pid 1")
    assert p.returncode == 128 + signal.SIGKILL and "still here" not in p.stdout, output(p)
    assert "error: the launcher (pid 1) is gone; this worker stops" in p.stderr, output(p)
