"""SIGKILL at random moments of saves (10 times, both ranks and their writer processes): after
every kill the tracker names a complete, intact checkpoint no older than before; every restart
resumes from it; the finished run's metrics hold each iteration once, equal to an uninterrupted
run bit for bit."""

from __future__ import annotations

import random
import time

import pytest

from megatron_vwn.checkpoint.files import check_files, iter_dir_name, read_manifest
from tests.distributed.checkpoint_helpers import (
    compared,
    kill_groups,
    rows,
    start_ranks,
    tracker,
    train,
    train_argv,
    wait_all,
    wait_for,
)

NPROC = 2
ITERS = 40
KILLS = 10
SAVE_EVERY_STEP = ["checkpoint.save_interval=1", "checkpoint.keep_last=2"]


def _save_started(path, since: float):
    """The save of ``path`` has begun in this attempt (not a directory left by an earlier one)."""
    def check() -> bool:
        try:
            return path.stat().st_mtime >= since
        except FileNotFoundError:
            return False
    return check


def _interrupted(path, latest: int, target: int) -> str:
    if latest >= target:
        return "after"
    if not path.exists():
        return "renamed"  # retention or a re-save had moved it away
    return "untracked" if (path / "checkpoint.json").exists() else "writing"


@pytest.mark.slow
def test_kill_9_during_saves_always_resumes_from_a_complete_checkpoint(tmp_path, data_cache):
    reference = tmp_path / "reference"
    train(reference, NPROC, [f"train.iters={ITERS}"], data_cache)

    run = tmp_path / "run"
    argv = train_argv(run, [f"train.iters={ITERS}", *SAVE_EVERY_STEP], data_cache)
    rng = random.Random(20261122)
    caught = []  # what each kill interrupted
    for attempt in range(KILLS):
        before = tracker(run)
        logs = tmp_path / f"attempt{attempt}"
        logs.mkdir()
        started = time.time()
        procs = start_ranks(NPROC, argv, logs)
        target = (before or 0) + rng.randint(1, 3)
        checkpoints = run / "checkpoints"
        wait_for(_save_started(checkpoints / iter_dir_name(target), started), 300, procs,
                 f"the save of iteration {target}")
        # Most kills right after the save began (a tiny model's save takes ~0.1-0.3 s, so on a
        # quiet machine later kills tend to land after it); every third anywhere in 0.5 s.
        time.sleep(rng.uniform(0.0, 0.5 if attempt % 3 == 2 else 0.03))
        kill_groups(procs)
        wait_all(procs, 60)

        if before is not None:
            rank0_log = next(logs.glob("rank0-*.log")).read_text()
            assert f"resumed from {checkpoints / iter_dir_name(before)} at iteration {before}" \
                in rank0_log
        latest = tracker(run)
        assert latest is not None and latest >= (before or 0)
        path = checkpoints / iter_dir_name(latest)
        assert check_files(path, read_manifest(path)) == []
        caught.append(_interrupted(checkpoints / iter_dir_name(target), latest, target))

    # The kills did land inside saves: files written but the checkpoint not yet complete, or
    # complete but not yet tracked (the previous checkpoint stayed the one to resume from).
    assert sum(state in ("writing", "untracked") for state in caught) >= 3, caught

    train(run, NPROC, [f"train.iters={ITERS}", *SAVE_EVERY_STEP], data_cache)
    got = rows(run)
    assert [r["iteration"] for r in got if r["split"] == "train"] == list(range(1, ITERS + 1))
    assert compared(got) == compared(rows(reference))
