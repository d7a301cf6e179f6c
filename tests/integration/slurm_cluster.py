"""A throwaway SLURM cluster on this machine: munge + slurmctld + two ``slurmd -N`` nodes.

The recipe of ``PLATFORM.md`` ("SLURM on one machine"): Debian's ``slurm-wlm`` is built with
MULTIPLE_SLURMD, so one host can run several named node daemons. Everything the cluster writes
(munge key and socket, ``slurm.conf``, state, spool, logs, pid files) lives under one temporary
directory; ports are picked free; node names carry a per-cluster tag so that two test sessions on
one machine never share a name. Client commands find the cluster through ``SLURM_CONF``
(:attr:`LocalCluster.env`). :meth:`LocalCluster.stop` cancels every job, waits for them to end and
stops the daemons it started by their pids, then removes the ``/etc/hosts`` line it added.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "scontrol",
            "squeue", "scancel", "sinfo")
HOSTS = Path("/etc/hosts")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class ClusterError(RuntimeError):
    """The cluster could not be started or a job did not reach the expected state."""


def unavailable_reason() -> str | None:
    """Why a local SLURM cluster cannot run here, or None when it can."""
    missing = [b for b in BINARIES if shutil.which(b) is None
               and not Path("/usr/sbin", b).exists()]
    if missing:
        return (f"SLURM is not installed (missing {', '.join(missing)}); "
                f"install Debian's slurm-wlm and munge (`.ci/run` does, as root, with apt-get)")
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd runs jobs as their user, /etc/hosts)"
    if not os.access(HOSTS, os.W_OK):
        return f"{HOSTS} is not writable: the emulated node names cannot be made to resolve"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalCluster:
    """A running local cluster (see :func:`start_cluster`)."""

    root: Path
    nodes: list[str]
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    hosts_line: str | None = None

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    # ---- client commands -------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            env: dict | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                               f"{proc.stdout}{proc.stderr}")
        return proc

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, timeout: float = 300,
                 states: set[str] = FINAL_STATES) -> dict[str, str]:
        """Wait until the job is in one of ``states``; return its info."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise ClusterError(f"job {job_id} not in {sorted(states)} after {timeout}s: {info}\n"
                           + self.logs_tail())

    def wait_nodes_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(node) == "idle" for node in self.nodes):
                return
            time.sleep(0.5)
        raise ClusterError(f"nodes not idle after {timeout}s: {out!r}\n" + self.logs_tail())

    def logs_tail(self, chars: int = 3000) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    # ---- teardown --------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel all jobs, wait for them to end, stop our daemons, undo the hosts entry."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user=root", check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                out = self.run("squeue", "-h", "-o", "%i", check=False)
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.5)
        for name in sorted(self.procs, key=lambda n: (n == "munged", n == "slurmctld")):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        if self.hosts_line is not None:
            _remove_hosts_line(self.hosts_line)
            self.hosts_line = None


def _remove_hosts_line(line: str) -> None:
    with HOSTS.open("r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # other test sessions edit it too
        lines = f.read().splitlines(keepends=True)
        kept = [item for item in lines if item.rstrip("\n") != line]
        if len(kept) != len(lines):
            f.seek(0)
            f.write("".join(kept))
            f.truncate()


def _slurm_conf(root: Path, nodes: list[str], ports: list[int], ctld_port: int,
                cpus: int) -> str:
    host = socket.gethostname().split(".")[0]
    node_lines = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
        f"RealMemory=1000 State=UNKNOWN"
        for name, port in zip(nodes, ports, strict=True)
    )
    return f"""\
# Local test cluster (tests/integration/slurm_cluster.py): {len(nodes)} emulated nodes.
# cred_expire=5 and the short scheduling intervals make a requeued job start again within
# seconds (SLURM holds it for the credential lifetime, 120 s by default).
ClusterName=mvwntest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SwitchType=switch/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
PlugStackConfig={root}/plugstack.conf
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
ReturnToService=2
MinJobAge=3600
KillWait=10
JobRequeue=1
InactiveLimit=0
{node_lines}
PartitionName=debug Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(root: Path, num_nodes: int = 2, cpus: int = 1,
                  timeout: float = 60) -> LocalCluster:
    """Start munged, slurmctld and ``num_nodes`` slurmd daemons under ``root`` (a fresh dir)."""
    tag = secrets.token_hex(2)
    nodes = [f"t{tag}n{i + 1}" for i in range(num_nodes)]
    for sub in ("munge", "state", "run", "log", *(f"spool/{n}" for n in nodes)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    ctld_port = _free_port()
    ports = [_free_port() for _ in nodes]
    (root / "plugstack.conf").write_text("")
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, nodes, ports, ctld_port, cpus))
    # Jobs of two clusters on one host must not share a rendezvous port (train.sbatch).
    env = {**os.environ, "SLURM_CONF": str(conf),
           "MVWN_MASTER_PORT_BASE": str(random.randrange(21000, 60000))}
    for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
        if var != "SLURM_CONF":
            env.pop(var)
    cluster = LocalCluster(root=root, nodes=nodes, env=env)
    try:
        _add_hosts_entry(cluster)
        cluster.procs["munged"] = _daemon(
            root, "munged", [_which("munged"), "-F", "--force",
                             f"--socket={root}/munge/munge.socket", f"--key-file={key}",
                             f"--pid-file={root}/run/munged.pid",
                             f"--log-file={root}/log/munged.log",
                             f"--seed-file={root}/munge/munged.seed"], env)
        _wait_for(lambda: (root / "munge" / "munge.socket").exists(), timeout, "munged socket",
                  cluster)
        cluster.procs["slurmctld"] = _daemon(
            root, "slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(conf)], env)
        for node in nodes:
            cluster.procs[f"slurmd-{node}"] = _daemon(
                root, f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(conf)],
                env)
        cluster.wait_nodes_idle(timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _add_hosts_entry(cluster: LocalCluster) -> None:
    """Make the node names resolve to 127.0.0.1 (a rendezvous on the first node needs it)."""
    line = f"127.0.0.1 {' '.join(cluster.nodes)}  # megatron-vwn test cluster {cluster.root}"
    with HOSTS.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line + "\n")
    cluster.hosts_line = line


def _daemon(root: Path, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
    out = open(root / "log" / f"{name}.stdout", "w")
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_for(predicate, timeout: float, what: str, cluster: LocalCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited ({proc.returncode}) while waiting for {what}\n"
                                   + cluster.logs_tail()
                                   + _read(cluster.root / "log" / f"{name}.stdout"))
        time.sleep(0.2)
    raise ClusterError(f"timed out waiting for {what}\n" + cluster.logs_tail())


def _read(path: Path) -> str:
    return f"\n--- {path.name}\n{path.read_text(errors='replace')[-3000:]}" if path.exists() else ""
