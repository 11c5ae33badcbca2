"""`launch slurm`: write a filled-in SLURM batch script, or check one.

Three layouts, one renderer (the scripts in slurm/ are its output, so they cannot drift apart):
- torchrun, 1 node  (single_node): one task; `torchrun --standalone` starts one worker per device;
- torchrun, N nodes (multi_node):  one task per node; `srun torchrun` agents meet over c10d at the
  first host of the allocation, on a port derived from the job id;
- srun (srun_tasks): one task per device, no torchrun; launch/dist.py maps SLURM_PROCID etc.

Preemption route (the same in all three): `--signal=B:USR1@120` reaches the batch script only
(never the step: under `srun torchrun` that would kill torchrun's agent and orphan its workers).
The script's trap creates <run.dir>/STOP; every rank sees it at its next check, they agree, rank 0
checkpoints, all exit; the script then requeues the job, and the requeued job resumes from `latest`.

Nothing here imports torch: `launch slurm` answers in a fraction of a second.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launch.errors import UserError, fail

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


# --------------------------------------------------------------------------- rendering

HEADERS = {
    "single_node": "One node: one task runs `torchrun --standalone`, which starts one worker per {unit}.",
    "multi_node": "Several nodes: one task per node runs a torchrun agent; the agents rendezvous (c10d) at the first node.",
    "srun_tasks": "One SLURM task per {unit}, no torchrun: train_ddp.py maps SLURM_PROCID/LOCALID/NTASKS to rank and world size.",
}


def render(spec: Spec) -> str:
    s = spec.resolve()
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
        "# export NCCL_SOCKET_IFNAME=ib0      # network interface for NCCL (GPU, multi-node); `ip -br addr` lists them",
        "# export GLOO_SOCKET_IFNAME=eth0     # network interface for gloo (CPU jobs; also used for the checkpoint barrier)",
        "# export NCCL_DEBUG=INFO             # NCCL setup and errors in the log (WARN: errors only)",
        "# export TORCH_DISTRIBUTED_DEBUG=DETAIL  # check that collectives match across ranks (slower)",
        "# export PYTHON=/path/to/venv/bin/python  # default: the python on PATH when you ran sbatch",
        "# ================= end of edits ==============",
        "",
        "set -u",
        'PYTHON=${PYTHON:-python}',
    ]
    if torchrun:
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
        'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST; run dir $RUN_DIR; OMP_NUM_THREADS=$OMP_NUM_THREADS"',
        "",
        "# The signal only marks the run: the workers stop at their next step boundary, after rank 0 saved a checkpoint.",
        "STOPPING=0 TRAPS=0",
        "# shellcheck disable=SC2317  # called by the trap",
        "on_stop() { STOPPING=1; TRAPS=$((TRAPS + 1)); echo \"caught SIG$STOP_SIGNAL: asking the workers to checkpoint and stop\"; touch \"$RUN_DIR/STOP\"; }",
        'trap on_stop "$STOP_SIGNAL"',
        "",
        "# --cpus-per-task again for srun: Slurm 22.05 srun does not inherit it from the batch job.",
    ]
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
            "# Never torchrun here: each task is one rank (launch/dist.py reads SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS).",
            f'{srun} "$PYTHON" train_ddp.py "${{ARGS[@]}}" &',
        ]
    lines += [
        "STEP=$!",
        "# bash runs a trap only between commands, so srun runs in the background and `wait` is interrupted by",
        "# the signal; then it waits again for the step's real exit status.",
        'while :; do',
        '  SEEN=$TRAPS; wait "$STEP"; RC=$?',
        '  if [ "$RC" -le 128 ] || [ "$TRAPS" = "$SEEN" ]; then break; fi  # >128 after our trap ran: interrupted, not ended',
        'done',
        "",
        'if [ "$STOPPING" = 1 ] && [ "$RC" != 0 ]; then',
        '  JOB=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}  # an array task requeues as itself',
        '  echo "stopped (exit $RC): requeueing ${JOB:-$SLURM_JOB_ID}; it resumes from $RUN_DIR/checkpoints/latest"',
        '  scontrol requeue "${JOB:-$SLURM_JOB_ID}" || RC=75',
        "fi",
        'exit "$RC"',
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- checking

_SBATCH = re.compile(r"^#SBATCH\s+(.*)$")


def _options(line: str) -> dict[str, str]:
    """`--name=value` / `--name value` / flags of one #SBATCH or srun line (comments dropped)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split("#", 1)[0].split()
    out, i = {}, 0
    while i < len(words):
        w = words[i]
        if w.startswith("--"):
            name, eq, value = w[2:].partition("=")
            if not eq and i + 1 < len(words) and not words[i + 1].startswith("-") and name not in ("requeue", "exclusive", "standalone"):
                value, i = words[i + 1], i + 1
            out[name.replace("_", "-")] = value
        i += 1
    return out


SHORT = {"-N": "nodes", "-n": "ntasks", "-c": "cpus-per-task", "-t": "time", "-p": "partition", "-J": "job-name"}


def check(text: str) -> list[tuple[int, str]]:
    """Problems of a batch script as (line number, message); empty when it looks right."""
    lines = text.splitlines()
    sbatch: dict[str, tuple[int, str]] = {}
    for n, line in enumerate(lines, 1):
        m = _SBATCH.match(line.strip())
        if m:
            body = m.group(1)
            for short, long in SHORT.items():
                body = re.sub(rf"^{short}\s*(\S+)", rf"--{long}=\1", body)
            for k, v in _options(body).items():
                sbatch[k] = (n, v)
    # Logical commands: join backslash continuations, remember where each starts.
    commands, ends, start, buf = [], {}, 0, ""
    for n, line in enumerate(lines, 1):
        if not buf:
            start = n
        buf += line.rstrip("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            if buf.strip() and not buf.lstrip().startswith("#"):
                commands.append((start, buf))
                ends[start] = n
            buf = ""

    def at(start: int, pattern: str) -> int:
        """The physical line of a (continued) command that holds `pattern`."""
        for n in range(start, ends.get(start, start) + 1):
            if re.search(pattern, lines[n - 1]):
                return n
        return start

    problems: list[tuple[int, str]] = []

    def num(key: str):
        if key not in sbatch:
            return None
        m = re.match(r"(\d+)", sbatch[key][1].split(":")[-1])
        return int(m.group(1)) if m else None

    def line_of(key: str) -> int:
        return sbatch[key][0] if key in sbatch else 1

    srun_cmds = [(n, c) for n, c in commands if re.search(r"(^|[\s;&|(])srun\s", c)]
    torchrun_in_srun = [(n, c) for n, c in srun_cmds if re.search(r"\btorchrun\b|torch\.distributed\.run", c)]
    torchrun_cmds = [(n, c) for n, c in commands if re.search(r"\btorchrun\b|torch\.distributed\.run", c)]
    per_node = num("ntasks-per-node")
    nodes = num("nodes") or 1
    gpus = num("gpus-per-node") if "gpus-per-node" in sbatch else (num("gres") if "gres" in sbatch else None)

    if not srun_cmds and not torchrun_cmds:
        problems.append((1, "no srun or torchrun command found: is this a training batch script?"))
    for n, c in srun_cmds:
        if "--kill-on-bad-exit=1" not in c and not re.search(r"(^|\s)-K1?(\s|$)", c):
            problems.append((at(n, r"\bsrun\b"), "srun without --kill-on-bad-exit=1: one crashed task leaves the others waiting in a collective"))
    for n, c in torchrun_in_srun:
        opts = _options(c)
        if per_node is not None and per_node > 1:
            problems.append((line_of("ntasks-per-node"), f"--ntasks-per-node={per_node} with torchrun inside srun: use --ntasks-per-node=1 (one torchrun agent per node starts the workers)"))
        if "ntasks" in sbatch and num("ntasks") != nodes:
            problems.append((line_of("ntasks"), f"--ntasks={num('ntasks')} with torchrun inside srun on {nodes} node(s): one task per node"))
        if nodes > 1 and "standalone" in opts:
            problems.append((at(n, "--standalone"), f"torchrun --standalone on {nodes} nodes: each node would train alone; use --rdzv-backend=c10d --rdzv-endpoint=HEAD:PORT"))
        if nodes > 1 and "standalone" not in opts and not opts.get("rdzv-endpoint"):
            problems.append((n, "multi-node torchrun without --rdzv-endpoint=HEAD:PORT"))
    for n, c in torchrun_cmds:
        if _options(c).get("max-restarts", "0") != "0":
            problems.append((at(n, "--max-restarts"), "torchrun --max-restarts must be 0 inside SLURM: SLURM owns retries (requeue)"))
        if gpus:
            m = re.search(r"--nproc[-_]per[-_]node[= ](\S+)", c)
            value = m.group(1).strip("\"'") if m else ""
            var = re.fullmatch(r"\$\{?(\w+)\}?", value)
            where = at(n, "--nproc")
            if var:
                assigned = re.search(rf"^{var.group(1)}=(\d+)", text, re.M)
                if assigned:  # point at the assignment: that is what to edit
                    value, where = assigned.group(1), text[: assigned.start()].count("\n") + 1
            if value.isdigit() and int(value) != gpus:
                problems.append((where, f"torchrun starts {value} workers per node but --gpus-per-node={gpus}"))
    if srun_cmds and not torchrun_in_srun and gpus is not None and per_node != gpus:
        problems.append((line_of("ntasks-per-node"), f"srun mode: --ntasks-per-node={per_node} must equal --gpus-per-node={gpus} (one task per GPU)"))
    for n, c in commands:
        if re.search(r"(:-|=)\s*[\"']?(localhost|127\.0\.0\.1)\b", c) and re.search(r"MASTER_ADDR|HEAD|rdzv", c):
            problems.append((n, "falls back to localhost for the rendezvous host: on more than one node that splits the job; fail instead"))
    if "signal" in sbatch:
        n, value = sbatch["signal"]
        if "requeue" not in sbatch:
            problems.append((n, f"--signal={value} without --requeue: the job checkpoints on the signal but is never requeued to resume"))
        sig = value.split("@")[0]
        if not sig.startswith("B:") and srun_cmds:
            problems.append((n, f"--signal={value} signals the job steps, not this script: under srun torchrun it kills the agent; use --signal=B:{sig}@..."))
        name = sig.removeprefix("B:").upper().removeprefix("SIG")
        traps = [(m.group(1), m.group(2)) for m in re.finditer(r"^\s*trap\s+(\S+)\s+(.+)$", text, re.M)]
        stop_var = re.search(r"^STOP_SIGNAL=(\w+)", text, re.M)
        trapped = set()
        for _, sigs in traps:
            for w in sigs.split("#")[0].split():
                w = w.strip("\"'")
                if w in ("$STOP_SIGNAL", "${STOP_SIGNAL}") and stop_var:
                    w = stop_var.group(1)
                trapped.add(w.upper().removeprefix("SIG"))
        if not trapped:
            problems.append((n, f"--signal={value} but the script traps no signal: nothing asks the workers to checkpoint"))
        elif name not in trapped and not name.isdigit():
            problems.append((n, f"--signal={value} but the script traps {', '.join(sorted(trapped))}, not {name}"))
        waits = any(re.search(r"(^|[\s;])wait\b", c) for _, c in commands)
        if "B:" in sig and srun_cmds and not (waits and any(c.rstrip().endswith("&") for _, c in srun_cmds)):
            problems.append((n, "the trap can only run while the script waits: start srun in the background (&) and `wait` for it"))
    elif "requeue" in sbatch:
        problems.append((line_of("requeue"), "--requeue without --signal=B:USR1@SECONDS: the time limit kills the job without a checkpoint"))
    return sorted(set(problems))


# --------------------------------------------------------------------------- command line


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
