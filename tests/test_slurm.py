"""SLURM: the shipped templates on a real two-node Slurm cluster on this host, preemption with
requeue, and `launch slurm` rendering and checking.

The cluster (tests/slurm_cluster.py) is brought up once for this module: apt-get install when
missing, own munge key, slurmctld and two slurmd (`slurmd -N`), torn down at the end. Under CI
(CI=true) failing to bring it up fails the tests; elsewhere, without root, they skip.

All jobs are submitted at once when the module starts and run side by side; each test waits for
its own. Every job trains the same tiny config (SMALL), so every final model.pt must equal that of
`python train_ddp.py --nproc 2`, bit for bit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from launch.commands.slurm import Spec, check, render
from tests.helpers import PY, ROOT, SMALL, env, output, run
from tests.slurm_cluster import Cluster

STATE_DIR = Path("/tmp/launch-slurm-test")
TEMPLATES = ROOT / "slurm"
# What each shipped script is rendered from (a test keeps the files equal to the renderer's output).
SHIPPED = {
    "single_node.sbatch": Spec(nodes=1, gpus_per_node=4),
    "multi_node.sbatch": Spec(nodes=2, gpus_per_node=4),
    "srun_tasks.sbatch": Spec(mode="srun", nodes=1, gpus_per_node=4),
    "single_node_cpu.sbatch": Spec(nodes=1, procs_per_node=2, cpus_per_node=2, overrides=["train.device=cpu"]),
    "multi_node_cpu.sbatch": Spec(nodes=2, procs_per_node=1, cpus_per_node=2, overrides=["train.device=cpu"]),
    "srun_tasks_cpu.sbatch": Spec(mode="srun", nodes=1, procs_per_node=2, cpus_per_node=2, overrides=["train.device=cpu"]),
}
# Preemption: rank 0 pauses 4 s inside the step-4 checkpoint save (a window the test signals in);
# with check_every_steps=1 the workers then stop at step 5, checkpoint there and the job requeues.
STALL = "stall_save:step=4:seconds=4:rank=0"
PREEMPT = ["ckpt.every_steps=4", "train.check_every_steps=1"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


# --------------------------------------------------------------------------- the cluster and the jobs


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip("the Slurm cluster needs root (slurmctld/slurmd as root, /etc/hosts entries); CI=true makes this a failure")
    c = Cluster(STATE_DIR)
    try:
        c.up()
    except Exception as e:  # in CI this is a failure, never a skip
        c.down()
        pytest.fail(f"could not bring up the Slurm cluster: {e}")
    yield c
    c.down()


def job_env(**extra) -> dict:
    # The job runs this checkout with this interpreter: PATH finds python and torchrun next to it.
    return env(PATH=f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}", PYTHON=PY, **extra)


class Job:
    def __init__(self, cluster: Cluster, template: str, run_dir: Path, *overrides: str, sbatch_args=(), **extra_env):
        self.cluster, self.template, self.run_dir = cluster, template, run_dir
        self.log = run_dir.parent / f"{run_dir.name}.out"
        cmd = ["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={self.log}", f"--job-name={run_dir.name}", *sbatch_args,
               str(TEMPLATES / template), *SMALL, f"run.dir={run_dir}", *overrides]
        p = cluster.client(cmd, env=job_env(**extra_env))
        assert p.returncode == 0, f"sbatch failed: {p.stderr}"
        self.id = p.stdout.strip().split(";")[0]

    def info(self) -> dict:
        p = self.cluster.client(["scontrol", "-o", "show", "job", self.id])
        return dict(re.findall(r"(\w+)=(\S*)", p.stdout))

    def wait(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if info.get("JobState") in TERMINAL:
                return info
            time.sleep(0.5)
        self.cluster.client(["scancel", self.id])
        pytest.fail(f"job {self.id} ({self.template}) did not finish in {timeout:.0f} s: {self.info().get('JobState')}\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def describe(self) -> str:
        return f"job {self.id} ({self.template}) log:\n{self.text()}\n--- cluster logs\n{self.cluster.logs()}"


class Preempter(threading.Thread):
    """Sends the preemption signal (`scancel --batch --signal=USR1`, what --signal=B:USR1@T does at the
    time limit) once rank 0 is inside the stalled step-4 save, i.e. mid-training."""

    def __init__(self, job: Job):
        super().__init__(daemon=True)
        self.job, self.sent_at, self.error = job, None, None
        self.start()

    def run(self):
        deadline = time.monotonic() + 150
        ckdir = self.job.run_dir / "checkpoints"
        while time.monotonic() < deadline:
            if any(ckdir.glob(".step_00000004.pt.tmp-*")) or any(ckdir.glob(".step_00000004.dcp.tmp")):
                p = self.job.cluster.client(["scancel", "--batch", "--signal=USR1", self.job.id])
                self.sent_at = time.monotonic()
                self.error = None if p.returncode == 0 else p.stderr
                return
            time.sleep(0.05)
        self.error = "the job never reached the step-4 save"


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """Submit everything at once (preemption jobs first, they take longest), and start the reference run."""
    base = tmp_path_factory.mktemp("slurm")
    out = {}
    for mode, template, extra in (("torchrun", "single_node_cpu.sbatch", []), ("srun", "srun_tasks_cpu.sbatch", []),
                                  ("srun_fsdp", "srun_tasks_cpu.sbatch", ["dist.strategy=fsdp"])):
        job = Job(cluster, template, base / f"preempt_{mode}", *PREEMPT, *extra, LAUNCH_FAULT=STALL)
        out[f"preempt_{mode}"] = (job, Preempter(job))
    for template in ("single_node_cpu.sbatch", "srun_tasks_cpu.sbatch", "multi_node_cpu.sbatch"):
        out[template] = Job(cluster, template, base / template.split(".")[0])
    ref_dir = base / "reference"
    out["reference"] = (ref_dir, subprocess.Popen(
        [PY, "train_ddp.py", "--nproc", "2", *SMALL, f"run.dir={ref_dir}"], cwd=ROOT, env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ))
    yield out
    ref = out["reference"][1]
    if ref.poll() is None:
        ref.kill()


@pytest.fixture(scope="module")
def reference(jobs) -> dict:
    ref_dir, proc = jobs["reference"]
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"reference run failed:\n{text}"
    return torch.load(ref_dir / "model.pt", weights_only=True)


def assert_same_model(run_dir: Path, reference: dict, why: str, tolerance: float = 0.0) -> None:
    model = torch.load(run_dir / "model.pt", weights_only=True)
    assert model.keys() == reference.keys()
    differ = [k for k in reference if (model[k] - reference[k]).abs().max() > tolerance]
    assert not differ, f"final parameters differ from `train_ddp.py --nproc 2` in {differ}\n{why}"


def world_sizes(run_dir: Path) -> set:
    import json

    return {json.loads(line)["world_size"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"world_size"' in line}


# --------------------------------------------------------------------------- templates on the cluster


@pytest.mark.parametrize("template, launcher, nodes", [
    ("single_node_cpu.sbatch", "torchrun", 1),
    ("srun_tasks_cpu.sbatch", "slurm", 1),
    ("multi_node_cpu.sbatch", "torchrun", 2),
])
def test_template_trains_like_spawn(jobs, reference, template, launcher, nodes):
    job = jobs[template]
    info = job.wait()
    why = job.describe()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    assert info["NumNodes"] == str(nodes), why
    text = job.text()
    assert f"launcher={launcher} rank=0" in text and "world_size=2" in text, why
    assert world_sizes(job.run_dir) == {2}, why
    if nodes == 2:  # two slurmd "nodes": the job really spanned both, one agent each
        assert info["NodeList"] == "lt-n[1-2]", why
    assert_same_model(job.run_dir, reference, why)


@pytest.mark.parametrize("mode", ["torchrun", "srun", "srun_fsdp"])
def test_preemption_checkpoints_requeues_and_resumes(jobs, reference, mode):
    job, preempter = jobs[f"preempt_{mode}"]
    info = job.wait(timeout=150)
    preempter.join(1)
    why = job.describe()
    assert preempter.error is None and preempter.sent_at is not None, f"{preempter.error}\n{why}"
    text = job.text()
    # The first run: the trap fired, the workers stopped at the next step and saved there, the script requeued.
    assert "caught SIGUSR1" in text, why
    assert re.search(r"stopped by stop file .*STOP at step 5 \(mid-epoch 0\)", text), why
    kind = ".dcp" if mode.endswith("fsdp") else ".pt"  # FSDP: a sharded checkpoint, a directory
    assert "saved " + str(job.run_dir / "checkpoints" / f"step_00000005{kind}") in text, why
    assert f"requeueing {job.id}" in text, why
    # The second run (same job id, restart 1) resumed from that checkpoint and finished.
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    assert info["Restarts"] == "1", why
    assert f"job {job.id} (restart 1)" in text, why
    assert re.search(r"resumed from \S*step_00000005" + re.escape(kind) + r" \(epoch 0, step 5\)", text), why
    assert not (job.run_dir / "STOP").exists()
    assert world_sizes(job.run_dir) == {2}, why
    assert_same_model(job.run_dir, reference, why, tolerance=1e-6 if kind == ".dcp" else 0.0)


def test_templates_pass_sbatch_test_only(cluster):
    # The CPU scripts are valid for this cluster as shipped; `--test-only` asks slurmctld without running.
    for name in ("single_node_cpu.sbatch", "srun_tasks_cpu.sbatch", "multi_node_cpu.sbatch"):
        p = cluster.client(["sbatch", "--test-only", f"--chdir={ROOT}", str(TEMPLATES / name)])
        assert p.returncode == 0 and "to start at" in p.stderr, f"{name}: {p.stderr}"


# --------------------------------------------------------------------------- launch slurm


def test_shipped_templates_are_the_renderer_output_and_pass_every_check():
    assert sorted(p.name for p in TEMPLATES.glob("*.sbatch")) == sorted(SHIPPED)
    for name, spec in SHIPPED.items():
        path = TEMPLATES / name
        assert path.read_text() == render(spec), f"{name} differs from `launch slurm` output: regenerate it (slurm/README.md)"
        assert check(path.read_text()) == [], name
        p = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert p.returncode == 0, f"{name}: {p.stderr}"
    p = run([PY, "-m", "launch", "slurm", "--check", *map(str, sorted(TEMPLATES.glob("*.sbatch")))])
    assert p.returncode == 0 and p.stdout.count(": ok") == len(SHIPPED), output(p)


def test_shipped_templates_pass_shellcheck(cluster):
    # The cluster fixture installs shellcheck with Slurm (apt), so in CI this always runs.
    if not shutil.which("shellcheck"):
        pytest.fail("shellcheck is not installed")
    p = subprocess.run(["shellcheck", "--severity=info", *map(str, sorted(TEMPLATES.glob("*.sbatch")))], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def plant(name: str, old: str, new: str) -> tuple[str, int]:
    """A shipped template with one mistake; returns the text and the line the mistake is on."""
    text = (TEMPLATES / name).read_text()
    assert old in text, f"{old!r} not in {name}"
    line = text[: text.index(old)].count("\n") + 1
    return text.replace(old, new, 1), line


MISTAKES = [
    ("torchrun in srun, 4 tasks per node", "multi_node.sbatch", "#SBATCH --ntasks-per-node=1", "#SBATCH --ntasks-per-node=4", "with torchrun inside srun"),
    ("srun mode, tasks != GPUs", "srun_tasks.sbatch", "#SBATCH --ntasks-per-node=4", "#SBATCH --ntasks-per-node=2", "must equal --gpus-per-node=4"),
    ("signal without requeue", "single_node.sbatch", "#SBATCH --requeue", "#", "without --requeue"),
    ("requeue without signal", "single_node.sbatch", "#SBATCH --signal=B:USR1@120", "#", "--requeue without --signal"),
    ("signal to the step, not the script", "multi_node.sbatch", "--signal=B:USR1@120", "--signal=USR1@120", "signals the job steps"),
    ("trap and signal disagree", "srun_tasks.sbatch", "STOP_SIGNAL=USR1", "STOP_SIGNAL=USR2", "traps USR2, not USR1"),
    ("no kill-on-bad-exit", "srun_tasks_cpu.sbatch", "srun --kill-on-bad-exit=1 ", "srun ", "without --kill-on-bad-exit=1"),
    ("torchrun restarts", "single_node.sbatch", "--max-restarts=0", "--max-restarts=3", "--max-restarts must be 0"),
    ("standalone on two nodes", "multi_node.sbatch", "torchrun --nnodes", "torchrun --standalone --nnodes", "--standalone on 2 nodes"),
    ("localhost fallback", "multi_node.sbatch", 'HEAD=${HOSTS%%', 'HEAD=${HEAD:-localhost}; HEAD=${HOSTS%%', "falls back to localhost"),
    ("workers != GPUs", "single_node.sbatch", "PROCS_PER_NODE=4", "PROCS_PER_NODE=2", "starts 2 workers per node but --gpus-per-node=4"),
    ("srun in the foreground", "srun_tasks.sbatch", '"${ARGS[@]}" &', '"${ARGS[@]}"', "start srun in the background"),
]


@pytest.mark.parametrize("what, name, old, new, message", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_check_names_the_mistake_and_its_line(tmp_path, what, name, old, new, message):
    text, line = plant(name, old, new)
    found = check(text)
    hits = [(n, m) for n, m in found if message in m]
    assert hits, f"{what}: expected a problem containing {message!r}, got {found}"
    if what not in ("trap and signal disagree", "srun in the foreground", "signal without requeue", "requeue without signal"):
        assert hits[0][0] == line, f"{what}: reported on line {hits[0][0]}, the mistake is on line {line}"


def test_check_cli_reports_file_and_line_and_exits_1(tmp_path):
    text, line = plant("multi_node.sbatch", "#SBATCH --ntasks-per-node=1", "#SBATCH --ntasks-per-node=4")
    bad = tmp_path / "bad.sbatch"
    bad.write_text(text)
    p = run([PY, "-m", "launch", "slurm", "--check", str(bad), str(TEMPLATES / "single_node.sbatch")])
    assert p.returncode == 1, output(p)
    assert f"{bad}:{line}: --ntasks-per-node=4 with torchrun inside srun" in p.stdout, output(p)
    assert "single_node.sbatch: ok" in p.stdout, output(p)


def test_render_writes_a_checked_script(tmp_path):
    out = tmp_path / "job.sbatch"
    p = run([PY, "-m", "launch", "slurm", "--mode", "srun", "--nodes", "3", "--gpus-per-node", "8", "--time", "1-00:00:00",
             "--partition", "a100", "--signal", "USR2", "--signal-seconds", "300", "--config", "configs/synthetic.yaml",
             "train.lr=0.05", "-o", str(out)])
    assert p.returncode == 0, output(p)
    text = out.read_text()
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --time=1-00:00:00", "#SBATCH --partition=a100", "#SBATCH --signal=B:USR2@300", "STOP_SIGNAL=USR2",
                 "CONFIG=configs/synthetic.yaml", "OVERRIDES=(train.lr=0.05)"):
        assert line in text, line
    assert check(text) == []
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes must be >= 1"),
    (["--gpus-per-node", "4", "--procs-per-node", "2"], "a GPU job runs one process per GPU"),
    (["--signal", "HUP"], "--signal must be one of"),
    (["--mode", "mpi"], "invalid choice"),
    (["--time", "soon"], "--time must look like"),
    (["oops"], "must look like section.key=value"),
    (["--check", "/nonexistent.sbatch"], "no such file"),
    (["--run-dir", "train.lr=x"], "train.lr"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    p = run([PY, "-m", "launch", "slurm", *args])
    assert p.returncode == 2, output(p)
    assert p.stderr.startswith("error: ") and message in p.stderr and p.stderr.count("\n") == 1, output(p)
