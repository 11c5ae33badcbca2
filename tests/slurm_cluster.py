"""A real two-node Slurm cluster on this one host, for the tests (and by hand: `python tests/slurm_cluster.py up|down`).

Two slurmd daemons (`slurmd -N lt-n1`, `slurmd -N lt-n2`, Slurm's multiple-slurmd mode) share
the host, so a job can span two "nodes". Everything lives under one state directory in /tmp: its
own munge key and socket, slurm.conf, spool, logs. Clients find it through SLURM_CONF.
Needs root (slurmd runs jobs as their user, and the node names go into /etc/hosts).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "shellcheck"]  # shellcheck: lints the templates
NODES = ["lt-n1", "lt-n2"]
HOSTS_MARK = "# launch-tests slurm nodes"
BASE_PORT = 16900  # ctld, then one per slurmd; away from the 20000-39999 job-id ports

CONF = """\
# Written by tests/slurm_cluster.py: a throwaway cluster of {nodes} on host {host}.
ClusterName=launchtest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire=10: a requeued job may restart once its old credential expired (default 120 s).
AuthInfo=socket={dir}/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/backfill
# Schedule every 1-2 s instead of every minute, so a requeued job restarts in seconds.
SchedulerParameters=bf_interval=1,sched_interval=2
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
MessageTimeout=10
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
{node_lines}
PartitionName=debug Nodes={nodelist} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.conf = self.dir / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict:
        """Variables a client (sbatch, scontrol) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------ bring-up

    def install(self) -> None:
        if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged", "shellcheck")):
            return
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")

    def _add_hosts(self) -> None:
        # Jobs resolve the first node name (MASTER_ADDR, the rendezvous endpoint); both nodes are this host.
        hosts = Path("/etc/hosts")
        text = hosts.read_text()
        if HOSTS_MARK not in text:
            hosts.write_text(text.rstrip("\n") + f"\n127.0.0.1 {' '.join(NODES)} {HOSTS_MARK}\n")

    def _remove_hosts(self) -> None:
        hosts = Path("/etc/hosts")
        lines = hosts.read_text().splitlines(keepends=True)
        kept = [line for line in lines if HOSTS_MARK not in line]
        if kept != lines:
            hosts.write_text("".join(kept))

    def up(self, timeout: float = 60) -> None:
        self.install()
        self.down()  # a previous session that died without teardown
        shutil.rmtree(self.dir, ignore_errors=True)
        for sub in ("munge", "state", "log", "spool"):
            (self.dir / sub).mkdir(parents=True)
        os.chmod(self.dir / "munge", 0o755)  # munged refuses a socket directory that others cannot enter
        self._add_hosts()
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chmod(key, 0o400)
        self._write_conf()
        m = self.dir / "munge"
        self._run(["munged", "--force", f"--socket={m}/munge.socket", f"--key-file={key}", f"--pid-file={m}/munged.pid",
                   f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"])
        self._wait(lambda: (m / "munge.socket").exists(), 10, "munged socket")
        self._run(["slurmctld", "-f", str(self.conf)])
        for node in NODES:
            self._run(["slurmd", "-f", str(self.conf), "-N", node])
        self._wait(self._nodes_idle, timeout, "both slurmd nodes idle")

    def _write_conf(self) -> None:
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={BASE_PORT + 2 + i} CPUs=2 State=UNKNOWN"
            for i, n in enumerate(NODES)
        )
        self.conf.write_text(CONF.format(
            nodes=", ".join(NODES), host=self.host, dir=self.dir, ctld_port=BASE_PORT, slurmd_port=BASE_PORT + 1,
            node_lines=node_lines, nodelist=",".join(NODES),
        ))

    def _run(self, cmd: list[str]) -> None:
        p = subprocess.run(cmd, env=dict(os.environ, **self.env), capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}\n{self.logs()}")

    def _nodes_idle(self) -> bool:
        p = self.client(["sinfo", "-h", "-N", "-o", "%N %t"])
        states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
        return p.returncode == 0 and all(states.get(n) == "idle" for n in NODES)

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*.log")) + [self.dir / "munge" / "munged.log"]:
            if f.exists():
                out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    # ------------------------------------------------------------------ use

    def client(self, cmd: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=dict(env or os.environ, **self.env), capture_output=True, text=True, timeout=30, **kw)

    # ------------------------------------------------------------------ teardown

    def down(self) -> None:
        """Kill the daemons (jobs first, so no training process outlives the session)."""
        if _alive_pidfile(self.dir / "slurmctld.pid"):  # a dead controller would make scancel retry for a minute
            try:
                self.client(["scancel", "--user=root"])
            except subprocess.TimeoutExpired:
                pass
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _alive_pidfile(self.dir / "slurmctld.pid"):
                q = self.client(["squeue", "-h", "-o", "%i"])
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.3)
        pidfiles = [self.dir / "slurmctld.pid", *(self.dir / f"slurmd-{n}.pid" for n in NODES), self.dir / "munge" / "munged.pid"]
        pids = []
        for f in pidfiles:
            try:
                pids.append(int(f.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                continue
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for pid in pids:
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._remove_hosts()


def _alive_pidfile(path: Path) -> bool:
    try:
        return _alive(int(path.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    c = Cluster(Path(os.environ.get("LAUNCH_SLURM_DIR", "/tmp/launch-slurm-test")))
    if sys.argv[1:] == ["up"]:
        c.up()
        print(f"export SLURM_CONF={c.conf}")
    elif sys.argv[1:] == ["down"]:
        c.down()
    else:
        sys.exit("usage: slurm_cluster.py up|down")
