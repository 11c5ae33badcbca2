"""Rendering a batch script from a Spec: three layouts from one source (see launch.commands.slurm)."""

from __future__ import annotations

import shlex

from launch.commands.slurm.spec import Spec

HEADERS = {
    "single_node": "One node: one task runs `torchrun --standalone`, which starts one worker per {unit}.",
    "multi_node": "Several nodes: one task per node runs a torchrun agent; the agents rendezvous (c10d) at the first node.",
    "srun_tasks": "One SLURM task per {unit}, no torchrun: train_ddp.py maps SLURM_PROCID/LOCALID/NTASKS to rank and world size.",
}

# The end of the block to edit (commented-out settings), then the script's own start.
ENV_HINTS = r"""# export NCCL_SOCKET_IFNAME=ib0      # network interface for NCCL (GPU, multi-node); `ip -br addr` lists them
# export GLOO_SOCKET_IFNAME=eth0     # network interface for gloo (CPU jobs; also used for the checkpoint barrier)
# export NCCL_DEBUG=INFO             # NCCL setup and errors in the log (WARN: errors only)
# export TORCH_DISTRIBUTED_DEBUG=DETAIL  # check that collectives match across ranks (slower)
# export PYTHON=/path/to/venv/bin/python  # default: the python on PATH when you ran sbatch
# ================= end of edits ==============

set -u
PYTHON=${PYTHON:-python}""".split("\n")

# The job's first log line, and the trap that turns the stop signal into a STOP file.
STOP_TRAP = r"""echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST; run dir $RUN_DIR; OMP_NUM_THREADS=$OMP_NUM_THREADS"

# The signal only marks the run: the workers stop at their next step boundary, after rank 0 saved a checkpoint.
STOPPING=0 TRAPS=0
# shellcheck disable=SC2317  # called by the trap
on_stop() { STOPPING=1; TRAPS=$((TRAPS + 1)); echo "caught SIG$STOP_SIGNAL: asking the workers to checkpoint and stop"; touch "$RUN_DIR/STOP"; }
trap on_stop "$STOP_SIGNAL"

# --cpus-per-task again for srun: Slurm 22.05 srun does not inherit it from the batch job.""".split("\n")


def render(spec: Spec) -> str:
    """The whole batch script: the header to edit, the setup, the launch, and the wait-and-requeue tail."""
    s = spec.resolve()
    return "\n".join([*_header(s), *_setup(s), *_launch(s), *TAIL])


def _header(s: Spec) -> list[str]:
    gpu = s.gpus_per_node > 0
    unit = "GPU" if gpu else "process"
    torchrun = s.mode == "torchrun"
    tasks = 1 if torchrun else s.procs_per_node
    cpus_per_task = s.cpus_per_node // tasks
    lines = [
        "#!/bin/bash",
        f"# {HEADERS[s.layout].format(unit=unit)}",
        "# Submit from the repository root:  sbatch THIS_FILE [section.key=value ...]   (arguments are appended to the overrides)",
        "# Check it after editing:            python -m launch slurm --check THIS_FILE",
    ]
    lines += [
        "#",
        "# ================= edit here =================",
        f"#SBATCH --job-name={s.job_name}",
        f"#SBATCH --nodes={s.nodes}",
        f"#SBATCH --ntasks-per-node={tasks}" + ("            # torchrun mode: ONE agent per node, never more" if torchrun else f"            # srun mode: one task per {unit}"),
    ]
    if gpu:
        lines.append(f"#SBATCH --gpus-per-node={s.gpus_per_node}" + ("" if torchrun else "              # = --ntasks-per-node"))
    lines += [
        f"#SBATCH --cpus-per-task={cpus_per_task}" + ("             # cores for all workers of a node" if torchrun else "              # cores per task (OMP_NUM_THREADS)"),
        f"#SBATCH --time={s.time}",
    ]
    lines.append(f"#SBATCH --partition={s.partition}" if s.partition else "##SBATCH --partition=NAME          # remove one '#' to pick a partition")
    lines += [
        f"#SBATCH --signal=B:{s.signal}@{s.signal_seconds}          # B: this script (not the step) gets {s.signal} {s.signal_seconds} s before the time limit",
        "#SBATCH --requeue                     # SLURM owns retries: a stopped job goes back to the queue and resumes",
        "#SBATCH --open-mode=append            # a requeued job appends to the same log",
        "#SBATCH --output=%x-%j.out            # %x job name, %j job id",
    ]
    if torchrun:
        lines.append(f"PROCS_PER_NODE={s.procs_per_node}" + ("                      # = --gpus-per-node" if gpu else "                      # worker processes per node"))
    lines += [
        f"STOP_SIGNAL={s.signal}                      # = the signal in --signal above",
        f"CONFIG={shlex.quote(s.config)}" + "  # a YAML file, or empty for the defaults",
        "OVERRIDES=(" + " ".join(shlex.quote(o) for o in s.overrides) + ")  # section.key=value ...; run.dir decides where a requeued job resumes from",
        *ENV_HINTS,
    ]
    return lines


def _setup(s: Spec) -> list[str]:
    """Threads, the arguments, the run directory (where STOP goes), the rendezvous host, the trap."""
    lines = []
    if s.mode == "torchrun":
        lines.append('CPUS=${SLURM_CPUS_PER_TASK:-1}; export OMP_NUM_THREADS=$(( CPUS / PROCS_PER_NODE > 0 ? CPUS / PROCS_PER_NODE : 1 ))')
    else:
        lines.append("export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}")
    lines += [
        'ARGS=(${CONFIG:+--config "$CONFIG"} "${OVERRIDES[@]}" "$@")',
        '# The run directory these settings resolve to: the STOP file goes there (a one-line error if the config is bad).',
        'RUN_DIR=$("$PYTHON" -m launch slurm --run-dir "${ARGS[@]}") || exit 2',
        'rm -f "$RUN_DIR/STOP"  # left over from a job that died before honouring it: a requeued job must not stop at once',
    ]
    if s.layout == "multi_node":
        lines += [
            "# Rendezvous at the first host of the allocation; no localhost fallback (that would split the job into single-node runs).",
            'HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST") && HEAD=${HOSTS%%$\'\\n\'*} || HEAD=',
            'if [ -z "$HEAD" ]; then echo "error: cannot resolve the first host of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2; exit 2; fi',
            "PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))  # from the job id: two jobs sharing a node never collide",
        ]
    lines += [
        *STOP_TRAP,
    ]
    return lines


def _launch(s: Spec) -> list[str]:
    lines = []
    srun = 'srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}"'
    if s.layout == "single_node":
        lines += [
            f"{srun} --ntasks=1 \\",
            '  torchrun --standalone --nnodes=1 --nproc_per_node="$PROCS_PER_NODE" --max-restarts=0 \\',
            '  train_ddp.py "${ARGS[@]}" &',
        ]
    elif s.layout == "multi_node":
        lines += [
            "# --max-restarts=0: SLURM owns retries. Everything on this line is expanded once, here, identically for every node.",
            f'{srun} --ntasks-per-node=1 \\',
            '  torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$PROCS_PER_NODE" --max-restarts=0 \\',
            '  --rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="$SLURM_JOB_ID" \\',
            '  train_ddp.py "${ARGS[@]}" &',
        ]
    else:
        lines += [
            "# Never torchrun here: each task is one rank (launch/processes/dist.py reads SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS).",
            f'{srun} "$PYTHON" train_ddp.py "${{ARGS[@]}}" &',
        ]
    return lines


TAIL = [
        "STEP=$!",
        "# bash runs a trap only between commands, so srun runs in the background and `wait` is interrupted by",
        "# the signal; then it waits again for the step's real exit status.",
        'while :; do',
        '  SEEN=$TRAPS; wait "$STEP"; RC=$?',
        '  if [ "$RC" -le 128 ] || [ "$TRAPS" = "$SEEN" ]; then break; fi  # >128 after our trap ran: interrupted, not ended',
        'done',
        "",
        "# A stop ends in 75 (srun tasks), or 0 with $RUN_DIR/STOPPED (torchrun, which would restart a failed worker).",
        'if [ "$STOPPING" = 1 ] && { [ "$RC" != 0 ] || [ -f "$RUN_DIR/STOPPED" ]; }; then',
        '  JOB=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}  # an array task requeues as itself',
        '  echo "stopped (exit $RC): requeueing ${JOB:-$SLURM_JOB_ID}; it resumes from $RUN_DIR/checkpoints/latest"',
        '  scontrol requeue "${JOB:-$SLURM_JOB_ID}" || RC=75',
        "fi",
        'exit "$RC"',
        "",
]
