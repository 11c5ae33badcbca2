"""Rendering a Kubeflow Trainer v2 TrainJob from a Spec (see launch.commands.k8s). Plain text, so the
YAML can say why each line is there; every string is a JSON string, which YAML reads as written."""

from __future__ import annotations

import json
from pathlib import Path

from launch.commands.k8s.grace import Grace, estimate
from launch.commands.k8s.spec import Spec, pod_run_dir, split_settings

API_VERSION = "trainer.kubeflow.org/v1alpha1"
MANAGER = "launch.k8s/pods"  # who owns the runtime patch (one entry per manager)
RUNS_VOLUME, SHM_VOLUME = "runs", "dshm"


def q(value) -> str:
    return json.dumps(str(value))


def resolve(spec: Spec) -> tuple[list[str], Grace]:
    """The pods' train_ddp.py arguments (settings checked, run.dir on the volume) and the grace period."""
    from launch import config as config_mod  # torch-free: rendering stays a fraction of a second

    config, overrides = split_settings(spec.settings)
    cfg = config_mod.load(config or None, overrides)
    run_dir = pod_run_dir(str(cfg.run_dir), spec.mount)
    args = (["--config", config] if config else []) + [o for o in overrides if not o.startswith("run.dir=")]
    grace = estimate(cfg.train.check_every_steps, Path(cfg.run_dir), spec.grace_seconds, spec.checkpoint_gb,
                     spec.step_seconds, spec.write_mb_s)
    return args + [f"run.dir={run_dir}"], grace


def render(spec: Spec) -> str:
    s = spec.resolve()
    args, grace = resolve(s)
    return "\n".join([*_header(s), *_trainer(s, args, grace), *_patch(s, grace), ""])


def _header(s: Spec) -> list[str]:
    units = "GPU(s)" if s.gpus else "process(es)"
    return [
        f"# A Kubeflow Trainer v2 TrainJob written by `launch k8s`: {s.nodes} node(s) x {s.nproc_per_node} {units}, one pod per node;",
        f"# torchrun in each pod (PID 1) starts {s.nproc_per_node} train_ddp.py worker(s). docs/kubernetes.md has the whole story.",
        f"# Needs: Kubeflow Trainer v2.3 or later with the ClusterTrainingRuntime {s.runtime}, and the PersistentVolumeClaim",
        f"# {s.pvc} (ReadWriteMany: every node's pod mounts it) in the job's namespace.",
        f"#   kubectl apply -f THIS_FILE                   start, or resume from {s.mount}/.../checkpoints/latest",
        f"#   kubectl get trainjob {s.name}; kubectl logs -f -l jobset.sigs.k8s.io/jobset-name={s.name} --prefix",
        f"#   kubectl patch trainjob {s.name} --type merge -p '{{\"spec\":{{\"suspend\":true}}}}'   pause: SIGTERM, checkpoint, pods gone (false resumes)",
        f"#   kubectl delete trainjob {s.name}                 stop: SIGTERM, checkpoint; apply again to resume",
        f"apiVersion: {API_VERSION}",
        "kind: TrainJob",
        "metadata:",
        f"  name: {s.name}",
        *([f"  namespace: {s.namespace}"] if s.namespace else []),
        "spec:",
        "  runtimeRef:",
        "    apiGroup: trainer.kubeflow.org",
        "    kind: ClusterTrainingRuntime",
        f"    name: {q(s.runtime)}  # its torch policy sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK (the pod's index),",
        "    # PET_MASTER_ADDR (<name>-node-0-0.<name>, the first pod) and PET_MASTER_PORT in every pod: torchrun reads them",
    ]


def _trainer(s: Spec, args: list[str], grace: Grace) -> list[str]:
    requests = [f"        cpu: {q(s.cpus)}"] + ([f"        memory: {q(s.memory)}"] if s.memory else [])
    limits = ([f"        nvidia.com/gpu: {q(s.gpus)}"] if s.gpus else []) + ([f"        memory: {q(s.memory)}"] if s.memory else [])
    return [
        "  trainer:",
        f"    image: {q(s.image)}  # this project in the image's working directory (the pods run train_ddp.py from there)",
        f"    numNodes: {s.nodes}",
        f"    numProcPerNode: {s.nproc_per_node}  # PET_NPROC_PER_NODE: torchrun's workers per pod" + (" (one per GPU)" if s.gpus else ""),
        "    resourcesPerNode:",
        "      requests:",
        *requests,
        *(["      limits:", *limits] if limits else []),
        "    # Nothing about the world is on this command line: torchrun takes --nnodes, --nproc-per-node, --node-rank,",
        "    # --master-addr and --master-port from PET_* (static rendezvous: the first pod's torchrun hosts the store).",
        "    command:",
        '      - "torchrun"',
        '      - "--max-restarts=0"  # Kubernetes owns retries: the pod restarts its container, the Job replaces a lost pod',
        f"      - {q(f'--shutdown-timeout={grace.shutdown_timeout}')}  # after SIGTERM torchrun waits this long for its workers' checkpoint",
        '      - "train_ddp.py"',
        "    args:  # the settings; run.dir on the volume: every pod sees it and it outlives them, so a rerun resumes",
        *[f"      - {q(a)}" for a in args],
        "    env:",
        "      - name: OMP_NUM_THREADS  # the pod's cores shared by its workers",
        f"        value: {q(max(1, s.cpus // s.nproc_per_node))}",
        "      - name: PYTHONUNBUFFERED  # log lines reach `kubectl logs` as they are written",
        '        value: "1"',
        "      # - name: NCCL_SOCKET_IFNAME  # the interface between the nodes, if the pods have several",
        '      #   value: "eth0"',
        "      # - name: NCCL_DEBUG",
        '      #   value: "WARN"',
    ]


def _patch(s: Spec, grace: Grace) -> list[str]:
    pod = " " * 24
    return [
        "  runtimePatches:  # the pod fields a TrainJob may set: the grace period and the volumes",
        f"    - manager: {q(MANAGER)}",
        "      trainingRuntimeSpec:",
        "        template:",
        "          spec:",
        "            replicatedJobs:",
        "              - name: node",
        "                template:",
        "                  spec:",
        "                    template:",
        "                      spec:",
        f"{pod}# On pod deletion or preemption the kubelet sends SIGTERM to torchrun (PID 1), which passes it to the",
        f"{pod}# workers; they agree at their next check, rank 0 saves, all exit; SIGKILL comes after this many seconds:",
        *[f"{pod}# {line}" for line in grace.how],
        f"{pod}terminationGracePeriodSeconds: {grace.seconds}",
        f"{pod}volumes:",
        f"{pod}  - name: {RUNS_VOLUME}",
        f"{pod}    persistentVolumeClaim:",
        f"{pod}      claimName: {q(s.pvc)}",
        f"{pod}  - name: {SHM_VOLUME}  # /dev/shm is 64 MB in a container: DataLoader workers and NCCL need more",
        f"{pod}    emptyDir:",
        f"{pod}      medium: Memory",
        f"{pod}containers:",
        f"{pod}  - name: node",
        f"{pod}    volumeMounts:",
        f"{pod}      - name: {RUNS_VOLUME}",
        f"{pod}        mountPath: {q(s.mount)}",
        f"{pod}      - name: {SHM_VOLUME}",
        f'{pod}        mountPath: "/dev/shm"',
    ]
