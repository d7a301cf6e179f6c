"""A preemption storm: ten SIGUSR1/SIGTERM at random moments of one run (mid-step, during a
validation, during a periodic save), each followed by a restart. Every stop exits 0 with a
checkpoint of the iteration it stopped at, and the finished run's ``metrics.jsonl`` holds every
iteration once, bit-identical to an uninterrupted run. One rank keeps it fast; the ranks'
agreement on a signal is covered by ``test_checkpoint_resume.py``."""

from __future__ import annotations

import os
import random
import signal
import time

from tests.distributed.checkpoint_helpers import (
    compared,
    last_iteration,
    rows,
    start_ranks,
    tracker,
    train,
    train_argv,
    wait_all,
    wait_for,
)

ITERS = 40
SIGNALS = 10
OVERRIDES = [f"train.iters={ITERS}", "checkpoint.save_interval=3"]
SLOW = {"CKPT_TEST_STEP_SLEEP": "0.05"}  # room for a signal to land inside a step


def test_ten_signals_and_restarts_lose_and_repeat_nothing(tmp_path, data_cache):
    reference = tmp_path / "reference"
    train(reference, 1, OVERRIDES, data_cache)

    run = tmp_path / "run"
    argv = train_argv(run, OVERRIDES, data_cache)
    rng = random.Random(1602)
    stops = []
    for attempt in range(SIGNALS):
        before = tracker(run) or 0
        logs = tmp_path / f"attempt{attempt}"
        logs.mkdir()
        procs = start_ranks(1, argv, logs, env=SLOW)
        wait_for(lambda before=before: last_iteration(run) > before, 300, procs,
                 f"an iteration after {before}")
        time.sleep(rng.uniform(0.0, 0.3))
        sig = rng.choice([signal.SIGUSR1, signal.SIGTERM])
        os.kill(procs[0].pid, sig)
        assert wait_all(procs, 300) == [0], next(logs.glob("rank0-*.log")).read_text()[-3000:]
        stopped = tracker(run)
        assert before < stopped < ITERS and last_iteration(run) == stopped, (before, stopped)
        log = next(logs.glob("rank0-*.log")).read_text()
        assert f"stopping at iteration {stopped} on {sig.name}" in log
        stops.append(stopped)

    train(run, 1, OVERRIDES, data_cache)
    got = rows(run)
    assert [r["iteration"] for r in got if r["split"] == "train"] == list(range(1, ITERS + 1))
    assert compared(got) == compared(rows(reference)), stops
