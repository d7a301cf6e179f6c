"""A failed save loses nothing, through the CLI:

- ``debug.save_error_at`` (a real EFBIG write error on the last rank, two ranks): with
  ``checkpoint.on_save_error=stop`` the run exits 5 with one line, the tracker still names the
  previous checkpoint, the partial directory is gone and a restart resumes from the previous
  one; with ``continue`` it warns, trains on and the next interval's save succeeds;
- a real full disk: a small tmpfs as the checkpoints directory (root only).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from megatron_vwn.checkpoint.files import check_files, iter_dir_name, read_manifest
from tests.distributed.checkpoint_helpers import rows, tracker
from tests.distributed.fault_helpers import cli_train, error_lines, output

SAVE_EVERY_2 = ["checkpoint.save_interval=2", "train.eval_interval=0"]


def _intact(run, iteration: int) -> None:
    path = run / "checkpoints" / iter_dir_name(iteration)
    assert check_files(path, read_manifest(path)) == []


def test_failed_save_stops_or_continues_and_the_previous_checkpoint_stays(tmp_path, data_cache):
    run = tmp_path / "run"
    proc = cli_train(run, 2, ["train.iters=8", *SAVE_EVERY_2, "debug.save_error_at=[4]"],
                     data_cache)
    assert proc.returncode == 5, output(proc)
    (line,) = error_lines(proc)
    checkpoints = run / "checkpoints"
    assert f"saving checkpoint {checkpoints / iter_dir_name(4)} failed on rank 1: OSError: " \
           f"[Errno 27] File too large" in line
    assert f"the latest checkpoint is still {checkpoints / iter_dir_name(2)} (iteration 2)" in line
    assert "checkpoint.on_save_error=stop" in line
    assert tracker(run) == 2 and not (checkpoints / iter_dir_name(4)).exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        iter_dir_name(2), "latest_checkpointed_iteration.txt"]
    _intact(run, 2)

    proc = cli_train(run, 2, ["train.iters=8", *SAVE_EVERY_2, "debug.save_error_at=[6]",
                              "checkpoint.on_save_error=continue"], data_cache)
    assert proc.returncode == 0, output(proc)
    assert f"resumed from {checkpoints / iter_dir_name(2)} at iteration 2" in proc.stdout
    assert proc.stdout.count(f"saving checkpoint {checkpoints / iter_dir_name(6)} failed") == 1
    assert "training on (checkpoint.on_save_error=continue)" in proc.stdout
    assert not (checkpoints / iter_dir_name(6)).exists() and tracker(run) == 8
    _intact(run, 8)
    train = [r["iteration"] for r in rows(run) if r["split"] == "train"]
    assert train == list(range(1, 9))


def _mount_tmpfs(path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``path``; the reason when that is impossible here."""
    if os.geteuid() != 0:
        return "mounting a small tmpfs (a real full disk) needs root"
    path.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else f"mount -t tmpfs failed: {proc.stderr.strip()}"


def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path, data_cache):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    reason = _mount_tmpfs(checkpoints, "12m")  # one 8.3 MB checkpoint fits, two do not
    if reason:
        pytest.skip(reason)
    try:
        proc = cli_train(run, 1, ["train.iters=4", *SAVE_EVERY_2], data_cache)
        assert proc.returncode == 5, output(proc)
        (line,) = error_lines(proc)
        assert f"saving checkpoint {checkpoints / iter_dir_name(4)} failed on rank 0: " \
               f"OSError: [Errno 28] No space left on device" in line
        assert tracker(run) == 2 and not (checkpoints / iter_dir_name(4)).exists()
        _intact(run, 2)
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)
