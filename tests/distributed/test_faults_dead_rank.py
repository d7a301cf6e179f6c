"""A dead rank ends the job: ``megatron-vwn train --nproc 2`` (torchrun), one rank killed with
SIGKILL mid-run. The survivor stops within a bound with exit status 4 and one line naming the
lost rank and the latest checkpoint, which is intact; a restart resumes from it. (The same under
SLURM: ``tests/integration/test_slurm.py``.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil

from megatron_vwn.checkpoint.files import check_files, iter_dir_name, read_manifest
from tests.distributed.checkpoint_helpers import last_iteration, rows, tracker, wait_for
from tests.distributed.fault_helpers import ENV, cli_command, cli_train, output
from tests.process_guard import survivors

ITERS = 400  # far more than run before the kill
ENDS_WITHIN_S = 120  # generous: the survivor notices at once (gloo) or after parallel.timeout_s
# (60 s here); every process of the job is gone within it (docs/reliability.md: the bound)
OVERRIDES = ["checkpoint.save_interval=3", "train.eval_interval=0", "parallel.timeout_s=60"]


def rank_process(launcher: psutil.Process, rank: int) -> psutil.Process:
    """The process of training rank ``rank`` among the launcher's descendants."""
    for child in launcher.children(recursive=True):
        try:
            env = child.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if env.get("RANK") == str(rank) and "megatron_vwn.cli" in " ".join(child.cmdline()):
            return child
    raise LookupError(f"no rank {rank} under {launcher.pid}")


def test_killed_rank_ends_the_job_naming_it_and_the_checkpoint_stays(tmp_path, data_cache):
    run = tmp_path / "run"
    proc = subprocess.Popen(cli_command(run, 2, [f"train.iters={ITERS}", *OVERRIDES],
                                        data_cache),
                            env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: (tracker(run) or 0) >= 3 and last_iteration(run) >= 5, 400, [proc],
                 "a checkpoint and iteration 5")
        rank_process(psutil.Process(proc.pid), 1).send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        stdout, stderr = proc.communicate(timeout=ENDS_WITHIN_S)
        assert time.monotonic() - killed_at < ENDS_WITHIN_S
        # Nothing of the job outlives it: no rank, no checkpoint writer it forked.
        remaining = max(0.0, ENDS_WITHIN_S - (time.monotonic() - killed_at))
        left = survivors(str(run), within_s=remaining)
        assert left == [], left
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert proc.returncode == 4, output(result)
    latest = tracker(run)
    path = run / "checkpoints" / iter_dir_name(latest)
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("megatron-vwn: error:")]
    assert "rank 1 is lost (its heartbeats stopped)" in line, line
    assert f"the latest checkpoint is {path} (iteration {latest})" in line, line
    assert check_files(path, read_manifest(path)) == []

    proc = cli_train(run, 2, [f"train.iters={latest + 2}", *OVERRIDES], data_cache)
    assert proc.returncode == 0, output(proc)
    assert f"resumed from {path} at iteration {latest}" in proc.stdout
    train = [r["iteration"] for r in rows(run) if r["split"] == "train"]
    assert train == list(range(1, latest + 3))
