"""Issue 25 (Kubernetes): `launch k8s` renders a Kubeflow Trainer v2 TrainJob that validates against the
Trainer's API models, and its command, run here as the Trainer would run it in two pods (two process
trees with the PET_* variables its torch runtime sets), trains to the weights of `--nproc 2`.

Preemption as it happens in a pod: SIGTERM to PID 1 (torchrun) of one or both "pods" while rank 0 is
inside a checkpoint save; a checkpoint must be committed, and every process gone, within the rendered
terminationGracePeriodSeconds (the kubelet's SIGKILL); then the same command again (the restarted
container, the replacement pod) resumes and ends bitwise where an uninterrupted run ends.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob
from pydantic import ValidationError

from launch.commands.doctor import filesystem_of, sharing
from launch.commands.k8s import Spec, render
from tests.helpers import PY, ROOT, SMALL, env, output, run

# Rank 0 pauses 3 s inside the step-4 save (the window the test signals in); with a check every step
# the workers then stop at step 5 and checkpoint there.
STALL = "stall_save:step=4:seconds=3:rank=0"
PREEMPT = ["ckpt.every_steps=4", "train.check_every_steps=1"]


def validate(text: str) -> dict:
    """The TrainJob as the Trainer's API models read it; a field they do not know is dropped on the
    round trip (the models ignore unknown keys), so the round trip must give back what was written."""
    data = yaml.safe_load(text)
    job = TrainerV1alpha1TrainJob.from_dict(data)
    assert job.to_dict() == data, "the TrainJob has fields the Trainer API does not know (dropped on the round trip)"
    return data


def pod_spec(job: dict) -> dict:
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    return patch["template"]["spec"]["template"]["spec"]


def render_job(tmp_path: Path, *settings: str, **spec) -> tuple[dict, Path]:
    """A CPU TrainJob whose volume is tmp_path/pvc; returns it (validated) and the run directory."""
    run_dir = tmp_path / "pvc" / "job"
    spec = {"image": "launch:test", "nodes": 2, "cpus": 1, "mount": str(tmp_path / "pvc"), **spec}
    return validate(render(Spec(settings=[*SMALL, *settings, f"run.dir={run_dir}"], **spec))), run_dir


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("spec, settings", [
    (Spec(image="registry.example.com/launch:1.0", nodes=2, gpus=8, memory="200Gi"), ["--config", "configs/synthetic.yaml", "train.lr=0.05"]),
    (Spec(image="launch:dev", name="cpu-job", namespace="ml", nproc_per_node=2, cpus=4, pvc="shared-runs", mount="/mnt/runs"), ["train.device=cpu", "run.name=exp1"]),
], ids=["gpu-2-nodes", "cpu-1-node"])
def test_the_trainjob_validates_against_the_trainer_api(spec, settings):
    spec.settings = settings
    job = validate(render(spec))
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["name"] == spec.name and job["metadata"].get("namespace", "") == spec.namespace
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == spec.image and trainer["numNodes"] == spec.nodes
    assert trainer["numProcPerNode"] == (spec.gpus or spec.nproc_per_node)
    resources = trainer["resourcesPerNode"]
    assert resources.get("limits", {}).get("nvidia.com/gpu") == (str(spec.gpus) if spec.gpus else None)
    # The world comes from PET_* only: nothing on the command line would override the operator's values.
    command = trainer["command"]
    assert command[0] == "torchrun" and command[-1] == "train_ddp.py" and "--max-restarts=0" in command, command
    assert not [w for w in command if re.match(r"--(nnodes|nproc|node|master|rdzv|standalone)", w)], command
    grace = pod_spec(job)["terminationGracePeriodSeconds"]
    assert f"--shutdown-timeout={grace - 5}" in command and grace >= 30
    # The settings, then run.dir on the volume's mount.
    assert trainer["args"][:-1] == settings
    assert trainer["args"][-1] == f"run.dir={spec.mount}/{'exp1' if 'run.name=exp1' in settings else 'synthetic'}"
    pod = pod_spec(job)
    assert {"name": "runs", "persistentVolumeClaim": {"claimName": spec.pvc}} in pod["volumes"]
    mounts = pod["containers"][0]["volumeMounts"]
    assert pod["containers"][0]["name"] == "node" and {"name": "runs", "mountPath": spec.mount} in mounts
    assert {"name": "dshm", "mountPath": "/dev/shm"} in mounts
    names = [e["name"] for e in trainer["env"]]
    assert not [n for n in names if n.startswith("PET_")], "the Trainer refuses TrainJobs that set its PET_* variables"


@pytest.mark.parametrize("path, value", [
    (("spec", "trainer", "numNode"), 2),  # misspelled
    (("spec", "trainer", "numNodes"), "2"),  # a string where the API has an integer
    (("spec", "runtimePatches", 0, "trainingRuntimeSpec", "template", "spec", "replicatedJobs", 0, "template", "spec",
      "template", "spec", "terminationGracePeriodSeconds"), "60"),  # a string where the API has an integer
    (("spec", "runtimePatches", 0, "trainingRuntimeSpec", "template", "spec", "replicatedJobs", 0, "template", "spec",
      "template", "spec", "volumes", 0, "persistentVolumeClaim", "claimname"), "x"),  # misspelled, deep down
    (("spec", "runtimeRef", "name"), None),  # required
])
def test_the_validation_catches_what_the_api_would_refuse(path, value):
    data = yaml.safe_load(render(Spec(image="x", gpus=8)))
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is None:
        node.pop(path[-1])
    else:
        node[path[-1]] = value
    with pytest.raises((AssertionError, ValidationError)):
        validate(yaml.safe_dump(data))


def test_the_grace_period_is_measured_from_the_run_directory(tmp_path):
    """A 3 GB checkpoint (sparse) and 0.3 s per step in metrics.jsonl: 10 x 0.3 + 3 GB / 100 MB/s + 20 s
    = 53 s, rounded up to 60 s; the YAML says where each number came from."""
    run_dir = tmp_path / "pvc" / "big"
    (run_dir / "checkpoints").mkdir(parents=True)
    with open(run_dir / "checkpoints" / "step_00000200.pt", "wb") as f:
        f.truncate(3_000_000_000)
    (run_dir / "checkpoints" / "latest").write_text("step_00000200.pt\n")
    (run_dir / "metrics.jsonl").write_text('{"epoch": 0, "step": 100, "elapsed_s": 10.0}\n{"epoch": 1, "step": 150, "train_loss_step": 1}\n'
                                           '{"epoch": 1, "step": 200, "elapsed_s": 40.0}\n')
    settings = ["train.check_every_steps=10", f"run.dir={run_dir}"]
    text = render(Spec(image="x", mount=str(tmp_path / "pvc"), settings=settings))
    assert pod_spec(validate(text))["terminationGracePeriodSeconds"] == 60
    assert "x 0.3 s per step (measured" in text and "+ 3 GB checkpoint (measured" in text and "= 53.0 s" in text, text
    assert "--shutdown-timeout=55" in text
    slower = render(Spec(image="x", mount=str(tmp_path / "pvc"), write_mb_s=50, settings=settings))
    assert pod_spec(validate(slower))["terminationGracePeriodSeconds"] == 90  # 3 + 60 + 20 = 83
    given = render(Spec(image="x", mount=str(tmp_path / "pvc"), grace_seconds=300, settings=settings))
    assert pod_spec(validate(given))["terminationGracePeriodSeconds"] == 300 and "--shutdown-timeout=295" in given


def test_the_cli_writes_what_render_renders(tmp_path):
    out = tmp_path / "job.yaml"
    args = ["--image", "launch:1", "--nodes", "2", "--gpus", "4", "--name", "fsdp", "-o", str(out), "--", "--config", "configs/synthetic.yaml", "dist.strategy=fsdp"]
    p = run([PY, "-m", "launch", "k8s", *args])
    assert p.returncode == 0 and "wrote" in p.stderr, output(p)
    spec = Spec(image="launch:1", nodes=2, gpus=4, name="fsdp", settings=["--config", "configs/synthetic.yaml", "dist.strategy=fsdp"])
    assert out.read_text() == render(spec)


@pytest.mark.parametrize("args, message", [
    ([], "--image is required"),
    (["--image", "x", "--name", "Train"], "--name must be a DNS label"),
    (["--image", "x", "--nodes", "0"], "--nodes must be >= 1"),
    (["--image", "x", "--gpus", "8", "--nproc-per-node", "4"], "a GPU job runs one process per GPU"),
    (["--image", "x", "--memory", "lots"], "--memory must be a Kubernetes quantity"),
    (["--image", "x", "--", "train.lrr=0.1"], "train.lrr"),
    (["--image", "x", "--", "run.dir=/elsewhere/run"], "is not under the volume's mount /runs"),
    (["--image", "x", "--", "--nproc", "2"], "is not a setting for the pods"),
    (["--image", "x", "--", "--config", "no/such.yaml"], "no/such.yaml"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    p = run([PY, "-m", "launch", "k8s", *args])
    assert p.returncode == 2, output(p)
    assert p.stderr.startswith("error: ") and message in p.stderr and p.stderr.count("\n") == 1, output(p)
    assert p.stdout == ""


# --------------------------------------------------------------------------- the pods, as processes on this host


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pods:
    """The TrainJob's pods as local process trees: the container's command and args from the rendered
    YAML, its env, and what the Trainer's torch runtime adds (PET_*), with the pod's index as node rank.
    Every pod has KUBERNETES_SERVICE_HOST, so it is set too. Each torchrun is what would be PID 1."""

    def __init__(self, job: dict, logs: Path, **extra_env):
        trainer = job["spec"]["trainer"]
        port, n = free_port(), trainer["numNodes"]
        container_env = {e["name"]: e["value"] for e in trainer["env"]}
        self.logs = [logs.parent / f"{logs.name}-node{i}.log" for i in range(n)]
        self.procs = []
        for i in range(n):
            pet = dict(PET_NNODES=n, PET_NODE_RANK=i, PET_NPROC_PER_NODE=trainer["numProcPerNode"], PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=port)
            e = env(**container_env, **pet, KUBERNETES_SERVICE_HOST="127.0.0.1", PATH=f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra_env)
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen([*trainer["command"], *trainer["args"]], cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def text(self) -> str:
        return "\n".join(f"--- node {i}\n{log.read_text(errors='replace')}" for i, log in enumerate(self.logs))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("k8s") / "reference"
    p = run([PY, "train_ddp.py", "--nproc", "2", *SMALL, f"run.dir={run_dir}"])
    assert p.returncode == 0, output(p)
    return torch.load(run_dir / "model.pt", weights_only=True)


def assert_same_model(run_dir: Path, reference: dict, why: str) -> None:
    model = torch.load(run_dir / "model.pt", weights_only=True)
    assert model.keys() == reference.keys()
    differ = [k for k in reference if not torch.equal(model[k], reference[k])]
    assert not differ, f"final parameters differ from `train_ddp.py --nproc 2` in {differ}\n{why}"


def test_two_pods_train_like_nproc_2(tmp_path, reference):
    job, run_dir = render_job(tmp_path)
    pods = Pods(job, tmp_path / "pods")
    try:
        codes = pods.wait(180)
    finally:
        pods.kill()
    why = pods.text()
    assert codes == [0, 0], why
    assert re.search(r"launcher=torchrun rank=0 local_rank=0 world_size=2", why) and "rank=1 local_rank=0" in why, why
    assert_same_model(run_dir, reference, why)


def preempt(tmp_path: Path, signalled: tuple[int, ...]) -> tuple[dict, Path, list]:
    """Start the two pods, SIGTERM the PID 1 of those in `signalled` while rank 0 is inside the step-4
    save, and check what must happen within the grace period; returns the job, its run dir, the exit codes."""
    job, run_dir = render_job(tmp_path, *PREEMPT)
    grace = pod_spec(job)["terminationGracePeriodSeconds"]
    pods = Pods(job, tmp_path / "first", LAUNCH_FAULT=STALL)
    saving = run_dir / "checkpoints"
    try:
        deadline = time.monotonic() + 120
        while not any(saving.glob(".step_00000004.pt.tmp-*")):  # rank 0 is inside the step-4 save: mid-training
            assert time.monotonic() < deadline and all(p.poll() is None for p in pods.procs), f"never reached the step-4 save\n{pods.text()}"
            time.sleep(0.02)
        for i in signalled:
            pods.procs[i].send_signal(signal.SIGTERM)  # what the kubelet does to PID 1 of a pod being deleted
        sent, committed = time.monotonic(), None
        while time.monotonic() - sent < grace and committed is None:
            latest = saving / "latest"
            committed = time.monotonic() - sent if latest.exists() and latest.read_text().strip() != "step_00000004.pt" else None
            time.sleep(0.02)
        codes = pods.wait(max(0.1, grace - (time.monotonic() - sent)))  # then the kubelet's SIGKILL
        gone = time.monotonic() - sent
    finally:
        pods.kill()
    why = pods.text()
    assert committed is not None, f"no checkpoint committed within the grace period of {grace} s\n{why}"
    assert None not in codes, f"still running {grace} s after SIGTERM (the kubelet would SIGKILL now): {codes}\n{why}"
    cause = "SIGTERM" if len(signalled) == 2 else r"SIGTERM \(on 1 of 2 ranks\)"
    assert re.search(rf"stopped by {cause} at step 5 \(mid-epoch 0\)", why), why
    assert (saving / "latest").read_text().strip() == "step_00000005.pt", why
    print(f"SIGTERM to pod(s) {signalled}: checkpoint committed after {committed:.1f} s, all gone after {gone:.1f} s (grace {grace} s)")
    return job, run_dir, codes


def test_deleted_pods_save_within_the_grace_period_and_the_rerun_resumes(tmp_path, reference):
    """kubectl delete trainjob (or suspend, or a drained node pool): every pod gets SIGTERM."""
    job, run_dir, _ = preempt(tmp_path, (0, 1))
    again = Pods(job, tmp_path / "again")  # kubectl apply again: the same command
    try:
        codes = again.wait(180)
    finally:
        again.kill()
    why = again.text()
    assert codes == [0, 0], why
    assert re.search(r"resumed from \S*step_00000005\.pt \(epoch 0, step 5\)", why), why
    assert_same_model(run_dir, reference, why)


def test_one_preempted_pod_stops_both_and_the_other_pod_exits_non_zero(tmp_path):
    """A node preempted: only its pod gets SIGTERM. Every rank agrees, rank 0 saves, and the pod that was
    not signalled must end non-zero, at once: exit 0 would mark its index done (its Job would never rerun
    it), and torchrun's agent would then wait 300 s at its exit barrier for the pod that is gone. Non-zero,
    Kubernetes restarts its container, which resumes like the rerun above, while the Job replaces the other."""
    _, _, codes = preempt(tmp_path, (1,))
    assert codes[0] != 0, f"the pod that was not signalled exited {codes[0]}"


# --------------------------------------------------------------------------- launch doctor


Partition = collections.namedtuple("Partition", "device mountpoint fstype")


def test_doctor_shows_pet_variables_and_a_run_directory_no_other_node_sees(tmp_path):
    parts = [Partition("/dev/vda", "/", "ext4"), Partition("nfs.example:/export", "/runs", "nfs4"), Partition("overlay", "/", "overlay")]
    assert filesystem_of("/runs/job/checkpoints", parts) == ("nfs4", "/runs", "nfs.example:/export")
    assert filesystem_of("/home/me/runs", parts) == ("overlay", "/", "overlay")  # the last mount over / is the one seen
    assert sharing("nfs4") == "shared between nodes" and "gone with the pod" in sharing("overlay")
    if filesystem_of("/dev/shm")[0] != "tmpfs":
        pytest.skip("/dev/shm is not a tmpfs here")
    pet = dict(PET_NNODES="2", PET_NODE_RANK="1", PET_NPROC_PER_NODE="1", PET_MASTER_ADDR="train-node-0-0.train", PET_MASTER_PORT="29500")
    p = run([PY, "-m", "launch", "doctor", "--run-dir", f"/dev/shm/launch-k8s-test-{os.getpid()}/run"], KUBERNETES_SERVICE_HOST="10.0.0.1", **pet)
    assert p.returncode == 0, output(p)
    assert "in a pod (KUBERNETES_SERVICE_HOST=10.0.0.1)" in p.stdout, output(p)
    assert " ".join(f"{k}={v}" for k, v in sorted(pet.items())) in p.stdout, output(p)
    assert re.search(r"run dir filesystem\s+tmpfs at /dev/shm", p.stdout), output(p)
    assert re.search(r"WARNING: run directory /dev/shm/\S+ is on tmpfs .* no rerun can resume; .*ReadWriteMany PersistentVolumeClaim", p.stdout), output(p)
