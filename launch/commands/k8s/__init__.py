"""`launch k8s`: write a Kubeflow Trainer v2 TrainJob, the Kubernetes sibling of `launch slurm`.

One pod per node, each running `torchrun --max-restarts=0 --shutdown-timeout=N train_ddp.py <settings>`
from the image's working directory. The Trainer's torch runtime sets PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT in every pod, and torchrun reads each of its options
from PET_<OPTION>: the command names none of them, so the TrainJob's numNodes/numProcPerNode are the
only place the world is said.

Preemption route: the kubelet sends SIGTERM to the container's PID 1, torchrun itself (its handler
passes the signal to its workers and waits --shutdown-timeout before SIGKILL); the workers only set a
flag, agree at the next check, rank 0 checkpoints onto the PersistentVolumeClaim, all exit, all
within terminationGracePeriodSeconds (launch.commands.k8s.grace says how it is chosen). Kubernetes
owns retries (--max-restarts=0): a lost pod is replaced by its Job, a surviving one restarts its
container, and the same command resumes from `latest` on the volume.

Nothing here imports torch: `launch k8s` answers in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.commands.k8s.grace import estimate
from launch.commands.k8s.render import render
from launch.commands.k8s.spec import Spec
from launch.errors import fail

__all__ = ["Spec", "add_arguments", "estimate", "render", "run"]


def add_arguments(p) -> None:
    p.epilog = (
        "examples:\n"
        "  launch k8s --image registry.example.com/launch:1.0 --nodes 2 --gpus 8 -o job.yaml -- --config configs/synthetic.yaml train.lr=0.05\n"
        "  launch k8s --image launch:dev --nproc-per-node 2 --cpus 4 -- train.device=cpu\n"
        "settings after -- go to train_ddp.py in every pod; run.dir is placed on the volume (--mount)"
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.error = lambda message: fail(f"{message} (see launch k8s --help)")  # one line, exit 2, like every user mistake
    p.add_argument("--image", default="", help="container image with this project in its working directory (required)")
    p.add_argument("--name", default="train", help="TrainJob name; the pods are <name>-node-0-<i> (default train)")
    p.add_argument("--namespace", default="", help="metadata.namespace (default: kubectl's current one)")
    p.add_argument("--nodes", type=int, default=1, help="pods, one per node (numNodes)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per node (nvidia.com/gpu); 0 for a CPU job (gloo)")
    p.add_argument("--nproc-per-node", type=int, default=0, help="worker processes per node (default: one per GPU, else 1)")
    p.add_argument("--cpus", type=int, default=0, help="cores per node (default 8 per GPU, else one per process)")
    p.add_argument("--memory", default="", help="memory per node, e.g. 200Gi (default: not requested)")
    p.add_argument("--runtime", default="torch-distributed", help="ClusterTrainingRuntime to use (default torch-distributed)")
    p.add_argument("--pvc", default="launch-runs", help="ReadWriteMany PersistentVolumeClaim for the run directory (default launch-runs)")
    p.add_argument("--mount", default="/runs", help="where the pods mount it; run.dir goes below (default /runs)")
    p.add_argument("--grace-seconds", type=int, default=0, help="terminationGracePeriodSeconds (default: estimated, see the YAML)")
    p.add_argument("--checkpoint-gb", type=float, default=0.0, help="checkpoint size for the estimate (default: measured from the run directory, else 1)")
    p.add_argument("--step-seconds", type=float, default=0.0, help="seconds per optimizer step for the estimate (default: measured, else 2)")
    p.add_argument("--write-mb-s", type=float, default=100.0, help="the volume's write bandwidth for the estimate (default 100 MB/s)")
    p.add_argument("--config", default="", help="YAML config the job trains with (the same as --config after --)")
    p.add_argument("--output", "-o", help="write the YAML here (default: print it)")
    p.add_argument("settings", nargs="*", metavar="-- [--config FILE] section.key=value")


def run(args) -> int:
    spec = Spec(
        name=args.name, image=args.image, nodes=args.nodes, gpus=args.gpus, nproc_per_node=args.nproc_per_node,
        cpus=args.cpus, memory=args.memory, namespace=args.namespace, runtime=args.runtime, pvc=args.pvc,
        mount=args.mount, grace_seconds=args.grace_seconds, checkpoint_gb=args.checkpoint_gb,
        step_seconds=args.step_seconds, write_mb_s=args.write_mb_s,
        settings=(["--config", args.config] if args.config else []) + list(args.settings),
    )
    text = render(spec)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output} (TrainJob {spec.name}: {spec.nodes} node(s) x {spec.nproc_per_node} process(es))", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
