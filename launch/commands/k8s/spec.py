"""What a TrainJob is made from: the options of `launch k8s` and the training settings, checked and resolved.

The settings are checked here, on the machine that renders, with the same loader the pods will use
(a wrong key is one line now, not a crash-looping pod later), and the run directory is placed on the
PersistentVolumeClaim's mount.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from launch.errors import UserError

# The name becomes the pods' host names (<name>-node-0-<i>) and the rendezvous address (PET_MASTER_ADDR
# <name>-node-0-0.<name>): a DNS label, lower case, at most 63 characters with that suffix.
NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
QUANTITY = re.compile(r"\d+(\.\d+)?([EPTGMk]i?|[mu])?")


@dataclass
class Spec:
    name: str = "train"
    image: str = ""
    nodes: int = 1
    gpus: int = 0  # per node; 0: a CPU job (gloo)
    nproc_per_node: int = 0  # workers per node; GPU jobs: one per GPU
    cpus: int = 0  # cores per node; 0: 8 per GPU, or one per process on CPU
    memory: str = ""  # per node, a Kubernetes quantity (64Gi); empty: not requested
    namespace: str = ""
    runtime: str = "torch-distributed"  # the ClusterTrainingRuntime whose torch policy sets PET_*
    pvc: str = "launch-runs"  # the PersistentVolumeClaim (ReadWriteMany) the run directory lives on
    mount: str = "/runs"  # where the pods mount it
    grace_seconds: int = 0  # terminationGracePeriodSeconds; 0: estimated (launch.commands.k8s.grace)
    checkpoint_gb: float = 0.0  # for the estimate; 0: measured from the run directory, else assumed
    step_seconds: float = 0.0  # for the estimate; 0: measured from the run directory, else assumed
    write_mb_s: float = 100.0  # for the estimate: the volume's sustained write bandwidth
    settings: list[str] = field(default_factory=list)  # train_ddp.py's: --config FILE and section.key=value

    def resolve(self) -> "Spec":
        limit = 63 - len(f"-node-0-{max(self.nodes, 1) - 1}")
        if not NAME.fullmatch(self.name) or len(self.name) > limit:
            raise UserError(f"--name must be a DNS label (lower-case letters, digits, '-'; a letter first) of at most {limit} characters with {self.nodes} node(s), got '{self.name}'")
        if not self.image:
            raise UserError("--image is required: a container image with this project in its working directory (see docs/kubernetes.md)")
        if re.search(r"\s", self.image):
            raise UserError(f"--image must not contain spaces, got '{self.image}'")
        for name in ("nodes", "gpus", "nproc_per_node", "cpus", "grace_seconds"):
            value = getattr(self, name)
            if value < 0 or (name == "nodes" and value < 1):
                raise UserError(f"--{name.replace('_', '-')} must be {'>= 1' if name == 'nodes' else '>= 0'}, got {value}")
        for name in ("checkpoint_gb", "step_seconds"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.write_mb_s <= 0:
            raise UserError(f"--write-mb-s must be > 0, got {self.write_mb_s}")
        if self.gpus and self.nproc_per_node and self.nproc_per_node != self.gpus:
            raise UserError(f"--nproc-per-node {self.nproc_per_node} differs from --gpus {self.gpus}: a GPU job runs one process per GPU")
        if self.memory and not QUANTITY.fullmatch(self.memory):
            raise UserError(f"--memory must be a Kubernetes quantity such as 64Gi or 500M, got '{self.memory}'")
        if self.namespace and not NAME.fullmatch(self.namespace):
            raise UserError(f"--namespace must be a DNS label, got '{self.namespace}'")
        if not NAME.fullmatch(self.pvc.replace(".", "-")):
            raise UserError(f"--pvc must name a PersistentVolumeClaim (a DNS name), got '{self.pvc}'")
        if not self.mount.startswith("/") or self.mount.rstrip("/") in ("", "/dev", "/proc", "/sys", "/dev/shm"):
            raise UserError(f"--mount must be an absolute directory for the volume, got '{self.mount}'")
        self.mount = str(PurePosixPath(self.mount))
        self.nproc_per_node = self.nproc_per_node or self.gpus or 1
        self.cpus = self.cpus or (8 * self.gpus if self.gpus else self.nproc_per_node)
        if self.cpus < self.nproc_per_node:
            raise UserError(f"--cpus {self.cpus} is fewer than the {self.nproc_per_node} processes per node")
        return self


def split_settings(settings: list[str]) -> tuple[str, list[str]]:
    """train_ddp.py's arguments as its parser takes them: (config file, overrides)."""
    config, overrides, i = "", [], 0
    while i < len(settings):
        word = settings[i]
        if word in ("--config", "-c"):
            if i + 1 >= len(settings):
                raise UserError(f"{word} needs a file")
            config, i = settings[i + 1], i + 2
            continue
        if word.startswith("--config="):
            config = word.split("=", 1)[1]
        elif word.startswith("-"):
            raise UserError(f"'{word}' is not a setting for the pods: they run `torchrun train_ddp.py [--config FILE] section.key=value ...` (torchrun starts the processes)")
        elif "=" not in word or "." not in word.split("=", 1)[0]:
            raise UserError(f"setting '{word}' must look like section.key=value")
        else:
            overrides.append(word)
        i += 1
    return config, overrides


def pod_run_dir(run_dir: str, mount: str) -> str:
    """Where the run directory is in the pods: on the volume. A relative one (the default runs/<name>)
    moves under the mount, without its leading runs/; an absolute one must already be there."""
    path = PurePosixPath(run_dir)
    if path.is_absolute():
        if path == PurePosixPath(mount) or PurePosixPath(mount) not in path.parents:
            raise UserError(
                f"run.dir={run_dir} is not under the volume's mount {mount}: a pod's own filesystem goes with the pod "
                f"(a preempted job could not resume) and each node has its own; use run.dir={mount}/NAME or a relative one"
            )
        return str(path)
    parts = [p for p in path.parts if p not in (".",)]
    if parts and parts[0] == "runs" and len(parts) > 1:
        parts = parts[1:]
    if not parts or ".." in parts:
        raise UserError(f"run.dir={run_dir} cannot be placed under the volume's mount {mount}")
    return str(PurePosixPath(mount, *parts))
