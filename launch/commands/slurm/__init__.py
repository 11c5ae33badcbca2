"""`launch slurm`: write a filled-in SLURM batch script, or check one.

Three layouts, one renderer (the scripts in slurm/ are its output, so they cannot drift apart):
- torchrun, 1 node  (single_node): one task; `torchrun --standalone` starts one worker per device;
- torchrun, N nodes (multi_node):  one task per node; `srun torchrun` agents meet over c10d at the
  first host of the allocation, on a port derived from the job id;
- srun (srun_tasks): one task per device, no torchrun; launch/processes/dist.py maps SLURM_PROCID etc.

Preemption route (the same in all three): `--signal=B:USR1@120` reaches the batch script only
(never the step: under `srun torchrun` that would kill torchrun's agent and orphan its workers).
The script's trap creates <run.dir>/STOP; every rank sees it at its next check, they agree, rank 0
checkpoints, all exit; the script then requeues the job, and the requeued job resumes from `latest`.

Nothing here imports torch: `launch slurm` answers in a fraction of a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

from launch.commands.slurm.check import check
from launch.commands.slurm.render import render
from launch.commands.slurm.spec import Spec
from launch.errors import UserError, fail

__all__ = ["Spec", "add_arguments", "check", "render", "run"]



def add_arguments(p) -> None:
    p.epilog = (
        "examples:\n"
        "  launch slurm --nodes 2 --gpus-per-node 8 --time 12:00:00 --partition gpu --config configs/synthetic.yaml train.lr=0.05\n"
        "  launch slurm --mode srun --nodes 1 --cpus-per-node 16 --procs-per-node 4 -o job.sbatch\n"
        "  launch slurm --check job.sbatch"
    )
    p.formatter_class = __import__("argparse").RawDescriptionHelpFormatter
    p.error = lambda message: fail(f"{message} (see launch slurm --help)")  # one line, exit 2, like every user mistake
    p.add_argument("--check", metavar="FILE", nargs="+", help="validate existing batch scripts instead of writing one (exit 1 on problems)")
    p.add_argument("--run-dir", action="store_true", help="print the run directory that --config and the overrides resolve to (used by the scripts)")
    p.add_argument("--mode", default="torchrun", choices=("torchrun", "srun"), help="torchrun: one agent per node starts the workers; srun: one task per GPU/process")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0 for a CPU job (gloo)")
    p.add_argument("--procs-per-node", type=int, default=0, help="CPU jobs: worker processes per node (GPU jobs: one per GPU)")
    p.add_argument("--cpus-per-node", type=int, default=0, help="cores for the workers of a node (default 8 per GPU; CPU: one per process)")
    p.add_argument("--time", default="04:00:00")
    p.add_argument("--partition", default="")
    p.add_argument("--job-name", default="train")
    p.add_argument("--signal", default="USR1", help="signal sent to the batch script before the time limit (default USR1)")
    p.add_argument("--signal-seconds", type=int, default=120, help="how long before the time limit (default 120)")
    p.add_argument("--config", default="", help="YAML config the job trains with")
    p.add_argument("--output", "-o", help="write the script here (default: print it)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")


def run(args) -> int:
    if args.run_dir:
        from launch import config as config_mod

        print(config_mod.load(args.config or None, args.overrides).run_dir)
        return 0
    if args.check:
        bad = 0
        for name in args.check:
            path = Path(name)
            if not path.is_file():
                raise UserError(f"no such file: {name}")
            found = check(path.read_text())
            for n, msg in found:
                print(f"{name}:{n}: {msg}")
            if not found:
                print(f"{name}: ok")
            bad += bool(found)
        return 1 if bad else 0
    spec = Spec(
        mode=args.mode, nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
        cpus_per_node=args.cpus_per_node, job_name=args.job_name, time=args.time, partition=args.partition,
        signal=args.signal, signal_seconds=args.signal_seconds, config=args.config, overrides=list(args.overrides),
    )
    text = render(spec)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output} ({spec.layout}, {spec.nodes} node(s) x {spec.procs_per_node} process(es))", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
