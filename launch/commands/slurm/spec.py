"""What a batch script is made from: the options of `launch slurm`, checked and resolved."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from launch.errors import UserError

SIGNALS = ("USR1", "USR2", "TERM", "INT")


@dataclass
class Spec:
    mode: str = "torchrun"  # torchrun | srun
    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU job
    procs_per_node: int = 0  # workers per node; GPU jobs: one per GPU
    cpus_per_node: int = 0  # cores for all workers of a node; 0: 8 per GPU, or procs_per_node on CPU
    job_name: str = "train"
    time: str = "04:00:00"
    partition: str = ""
    signal: str = "USR1"
    signal_seconds: int = 120
    config: str = ""
    overrides: list[str] = field(default_factory=list)

    def resolve(self) -> "Spec":
        if self.mode not in ("torchrun", "srun"):
            raise UserError(f"--mode must be torchrun or srun, got '{self.mode}'")
        for name in ("nodes", "gpus_per_node", "procs_per_node", "cpus_per_node", "signal_seconds"):
            if getattr(self, name) < 0 or (name == "nodes" and self.nodes < 1):
                raise UserError(f"--{name.replace('_', '-')} must be {'>= 1' if name == 'nodes' else '>= 0'}, got {getattr(self, name)}")
        if self.gpus_per_node and self.procs_per_node and self.procs_per_node != self.gpus_per_node:
            raise UserError(f"--procs-per-node {self.procs_per_node} differs from --gpus-per-node {self.gpus_per_node}: a GPU job runs one process per GPU")
        self.signal = self.signal.upper().removeprefix("SIG")
        if self.signal not in SIGNALS:
            raise UserError(f"--signal must be one of {', '.join(SIGNALS)}, got '{self.signal}'")
        if not re.fullmatch(r"(\d+-)?\d{1,3}(:\d\d){0,2}", self.time):
            raise UserError(f"--time must look like HH:MM:SS, MM or D-HH:MM:SS, got '{self.time}'")
        if not re.fullmatch(r"[\w.+-]+", self.job_name):
            raise UserError(f"--job-name may hold letters, digits and . _ + - only, got '{self.job_name}'")
        for o in self.overrides:
            if "=" not in o or "." not in o.split("=", 1)[0]:
                raise UserError(f"override '{o}' must look like section.key=value")
        self.procs_per_node = self.procs_per_node or self.gpus_per_node or 1
        self.cpus_per_node = self.cpus_per_node or (8 * self.gpus_per_node if self.gpus_per_node else self.procs_per_node)
        if self.cpus_per_node % self.procs_per_node:
            raise UserError(f"--cpus-per-node {self.cpus_per_node} is not a multiple of {self.procs_per_node} processes per node")
        return self

    @property
    def layout(self) -> str:
        return "srun_tasks" if self.mode == "srun" else ("single_node" if self.nodes == 1 else "multi_node")
