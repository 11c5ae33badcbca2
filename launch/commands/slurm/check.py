"""`launch slurm --check`: the mistakes that make SLURM jobs hang, split, or lose their work, each named with its line."""

from __future__ import annotations

import re
import shlex

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


class Script:
    """A batch script read for checking: its #SBATCH options and its logical commands."""

    def __init__(self, text: str):
        self.text, self.lines, self.sbatch, self.commands, self.ends = text, *_parse(text)

    def at(self, start: int, pattern: str) -> int:
        """The physical line of a (continued) command that holds `pattern`."""
        for n in range(start, self.ends.get(start, start) + 1):
            if re.search(pattern, self.lines[n - 1]):
                return n
        return start

    def num(self, key: str):
        if key not in self.sbatch:
            return None
        m = re.match(r"(\d+)", self.sbatch[key][1].split(":")[-1])
        return int(m.group(1)) if m else None

    def line_of(self, key: str) -> int:
        return self.sbatch[key][0] if key in self.sbatch else 1


def _parse(text: str):
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
    return lines, sbatch, commands, ends


def check(text: str) -> list[tuple[int, str]]:
    """Problems of a batch script as (line number, message); empty when it looks right."""
    s = Script(text)
    return sorted(set(_launch_problems(s) + _signal_problems(s)))


def _launch_problems(s: Script) -> list[tuple[int, str]]:
    """srun and torchrun: kill-on-bad-exit, one agent per node, rendezvous, restarts, workers per GPU."""
    text, sbatch, commands, at, num, line_of = s.text, s.sbatch, s.commands, s.at, s.num, s.line_of
    problems: list[tuple[int, str]] = []
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
    return problems


def _signal_problems(s: Script) -> list[tuple[int, str]]:
    """Preemption: the signal reaches this script, is trapped, and the job is requeued."""
    text, sbatch, commands, line_of = s.text, s.sbatch, s.commands, s.line_of
    problems: list[tuple[int, str]] = []
    srun_cmds = [(n, c) for n, c in commands if re.search(r"(^|[\s;&|(])srun\s", c)]
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
    return problems
