"""One writer per run directory (``training/run_lease.py``): a second ``train`` on a directory
that a live job trains in is refused before it touches anything, with one line naming the
holder; after the holder is killed with SIGKILL the next job starts at once. The lease rules
themselves (stale heartbeat, same SLURM job) are checked without training at the end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.training import run_lease
from megatron_vwn.training.run_lease import LEASE_FILE, Holder, RunLease, check_run_dir_free
from tests.distributed.checkpoint_helpers import last_iteration, rows, wait_for
from tests.distributed.fault_helpers import ENV, cli_command, cli_train, error_lines, output
from tests.distributed.launcher import REPO

OVERRIDES = ["checkpoint.save_interval=0", "train.eval_interval=0"]


def test_a_second_job_is_refused_and_a_killed_holder_frees_the_directory(tmp_path, data_cache):
    run = tmp_path / "run"
    first = subprocess.Popen(cli_command(run, 1, ["train.iters=5000", *OVERRIDES], data_cache),
                             env={**os.environ, **ENV}, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: last_iteration(run) >= 2, 300, [first], "iteration 2")
        config = (run / "config.yaml").read_text()
        for nproc in (1, 2):  # a plain second start, and one through torchrun
            second = cli_train(run, nproc, ["train.iters=5000", *OVERRIDES], data_cache,
                               timeout=120)
            assert second.returncode == 2, output(second)
            (line,) = error_lines(second)
            assert (f"run.dir {run} is in use by another job (host {socket.gethostname()}, "
                    f"pid {first.pid}; heartbeat") in line, line
            assert "wait for it to end, stop it (kill " in line and "or give another run.dir" \
                in line, line
            assert "Traceback" not in second.stderr, output(second)
        assert first.poll() is None  # the holder trains on, its files untouched
        assert (run / "config.yaml").read_text() == config
        wait_for(lambda: last_iteration(run) >= 4, 300, [first], "iteration 4")
        train = [r["iteration"] for r in rows(run) if r["split"] == "train"]
        assert train == list(range(1, len(train) + 1))
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert json.loads((run / LEASE_FILE).read_text())["pid"] == first.pid  # left by the kill
    third = cli_train(run, 1, ["train.iters=2", *OVERRIDES], data_cache, timeout=300)
    assert third.returncode == 0, output(third)
    assert f"taking over the lease on {run} from host {socket.gethostname()}, pid {first.pid}" \
        in third.stdout + third.stderr, output(third)
    assert not (run / LEASE_FILE).exists()  # released at the end


def _plant(run_dir, holder: Holder, age_s: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LEASE_FILE
    path.write_text(json.dumps(holder.__dict__))
    stamp = path.stat().st_mtime - age_s
    os.utime(path, (stamp, stamp))


ELSEWHERE = Holder(host="another-node", pid=1, job="slurm:41", slurm_job_id="41",
                   restart_count=2)


def test_a_live_holder_elsewhere_is_refused_naming_its_job(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    _plant(tmp_path, ELSEWHERE, age_s=5)
    with pytest.raises(ConfigError, match=r"in use by another job \(host another-node, pid 1, "
                                          r"SLURM job 41, restart 2; heartbeat \d+ s ago\): "
                                          r".*stop it \(scancel 41\)"):
        check_run_dir_free(tmp_path)
    with pytest.raises(ConfigError, match="in use by another job"):
        RunLease.acquire(tmp_path)


def test_a_stale_heartbeat_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    _plant(tmp_path, ELSEWHERE, age_s=run_lease.STALE_S + 5)
    check_run_dir_free(tmp_path)
    lease = RunLease.acquire(tmp_path)
    assert json.loads((tmp_path / LEASE_FILE).read_text())["job"] == "slurm:42"
    lease.release()
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_requeued_slurm_job_takes_its_own_lease(tmp_path, monkeypatch):
    """The same SLURM job id (a requeue, restart count grown) is the same job: no waiting."""
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    _plant(tmp_path, ELSEWHERE, age_s=1)
    lease = RunLease.acquire(tmp_path)
    assert json.loads((tmp_path / LEASE_FILE).read_text())["restart_count"] == 3
    lease.release()


def test_the_heartbeat_keeps_the_lease_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lease, "HEARTBEAT_S", 0.1)
    lease = RunLease.acquire(tmp_path)
    try:
        stamp = time.time() - 120
        os.utime(tmp_path / LEASE_FILE, (stamp, stamp))
        time.sleep(0.5)
        assert time.time() - (tmp_path / LEASE_FILE).stat().st_mtime < 5
    finally:
        lease.release()
