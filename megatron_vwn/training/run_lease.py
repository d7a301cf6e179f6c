"""One writer per run directory: a lease file with a heartbeat, taken before any process group.

Two jobs on one ``run.dir`` (a double submission, a second ``train`` started by hand) would both
append to ``metrics.jsonl`` and write the same checkpoints. So rank 0 of a job holds
``RUN_DIR/.megatron-vwn.lease`` while it trains: a JSON record of who holds it (host, pid, SLURM
job id and restart count, the job's identity), whose modification time rank 0 refreshes every
:data:`HEARTBEAT_S`. A job that finds a lease held by another live job is refused on every rank,
before anything is written, with one line naming the holder.

A lease is *released* when its holder ends normally (the file is removed) and is *free to take*
when:

- it belongs to the same job: a SLURM requeue keeps ``SLURM_JOB_ID`` (its restart count grows),
  and SLURM has ended the previous incarnation first;
- its heartbeat is older than :data:`STALE_S` (holder killed with -9, node lost), measured on the
  filesystem's own clock (the modification time of a file written now), so clock skew between
  nodes does not matter;
- its holder ran on this host and that process no longer exists (no need to wait).

Why a heartbeat file rather than a lock the kernel releases: ``flock``/``fcntl`` locks are not
reliable on the shared filesystems clusters keep run directories on (Lustre mounted without
``flock``, NFS lock daemons that lose locks across server restarts, locks local to one client);
an atomic create (``O_EXCL``), ``rename`` and modification times work on all of them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_vwn.config.errors import ConfigError

logger = logging.getLogger(__name__)

LEASE_FILE = ".megatron-vwn.lease"
HEARTBEAT_S = 10.0
"""How often the holder refreshes the lease's modification time."""
STALE_S = 60.0
"""A lease whose heartbeat is older than this is taken over (six missed heartbeats)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    job: str
    """The job's identity, the same on all its ranks: SLURM job id, torchrun run id, or the
    rendezvous address of a plain launch (host:pid for a single process)."""
    slurm_job_id: str | None = None
    restart_count: int | None = None

    @classmethod
    def here(cls) -> Holder:
        env = os.environ
        host, pid = socket.gethostname(), os.getpid()
        slurm = env.get("SLURM_JOB_ID")
        if slurm:
            job = f"slurm:{slurm}"
        elif env.get("TORCHELASTIC_RUN_ID"):
            job = f"torchrun:{env['TORCHELASTIC_RUN_ID']}"
        elif "RANK" in env and "MASTER_ADDR" in env:
            job = f"launch:{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '')}"
        else:
            job = f"process:{host}:{pid}"
        restarts = env.get("SLURM_RESTART_COUNT")
        return cls(host=host, pid=pid, job=job, slurm_job_id=slurm,
                   restart_count=int(restarts) if restarts else None)

    def describe(self) -> str:
        parts = [f"host {self.host}", f"pid {self.pid}"]
        if self.slurm_job_id:
            parts.append(f"SLURM job {self.slurm_job_id}")
            if self.restart_count:
                parts.append(f"restart {self.restart_count}")
        return ", ".join(parts)


def _read(path: Path) -> tuple[Holder, float] | None:
    """The holder and the age of its heartbeat in seconds, or None (no lease, or unreadable
    because it is being replaced: treated as absent, the create below settles it)."""
    try:
        holder = Holder(**json.loads(path.read_text()))
        mtime = path.stat().st_mtime
    except (OSError, ValueError, TypeError):
        return None
    return holder, _filesystem_now(path.parent) - mtime


def _filesystem_now(directory: Path) -> float:
    """Now, on the clock that stamps this directory's files."""
    probe = directory / f".megatron-vwn.clock.{socket.gethostname()}.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        return probe.stat().st_mtime
    except OSError:
        return time.time()
    finally:
        probe.unlink(missing_ok=True)


def _process_gone(holder: Holder) -> bool:
    if holder.host != socket.gethostname():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _refusal(run_dir: Path, holder: Holder, age: float) -> ConfigError:
    stop = (f"scancel {holder.slurm_job_id}" if holder.slurm_job_id
            else f"kill {holder.pid} on {holder.host}")
    return ConfigError(
        f"run.dir {run_dir} is in use by another job ({holder.describe()}; heartbeat "
        f"{max(age, 0):.0f} s ago): wait for it to end, stop it ({stop}), or give another "
        f"run.dir; a holder that died frees it {STALE_S:.0f} s after its last heartbeat")


def _free_for(here: Holder, found: tuple[Holder, float] | None) -> bool:
    if found is None:
        return True
    holder, age = found
    return holder.job == here.job or age > STALE_S or _process_gone(holder)


def check_run_dir_free(run_dir: str | Path) -> None:
    """Refuse (``ConfigError``) when another live job holds ``run_dir``; every rank calls it,
    and ``train --nproc`` before it starts the ranks. Touches nothing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    found = _read(run_dir / LEASE_FILE)
    if not _free_for(Holder.here(), found):
        raise _refusal(run_dir, *found)


class RunLease:
    """Rank 0's lease on the run directory (see the module docstring)."""

    def __init__(self, run_dir: Path, holder: Holder):
        self.path = run_dir / LEASE_FILE
        self.holder = holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="megatron-vwn-run-lease",
                                        daemon=True)

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLease:
        """Create or take over the lease, or refuse naming its holder."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        here = Holder.here()
        lease = cls(run_dir, here)
        record = json.dumps(asdict(here))
        try:
            fd = os.open(lease.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            found = _read(lease.path)
            if not _free_for(here, found):
                raise _refusal(run_dir, *found) from None
            if found is not None and found[0].job != here.job:
                logger.warning("taking over the lease on %s from %s (heartbeat %.0f s ago)",
                               run_dir, found[0].describe(), found[1])
            tmp = lease.path.with_name(f"{LEASE_FILE}.{here.host}.{here.pid}")
            tmp.write_text(record)
            os.replace(tmp, lease.path)
            time.sleep(0.2)  # two jobs taking over the same stale lease: the last one wins
            current = _read(lease.path)
            if current is not None and current[0] != here:
                raise _refusal(run_dir, *current) from None
        else:
            with os.fdopen(fd, "w") as f:
                f.write(record)
        lease._thread.start()
        return lease

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # the directory went away; nothing left to guard
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        self._thread.join(timeout=5)
        found = _read(self.path)
        if found is not None and found[0] == self.holder:
            self.path.unlink(missing_ok=True)
