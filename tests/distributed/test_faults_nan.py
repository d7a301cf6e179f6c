"""NaN/Inf policy through the CLI (``debug.nan_at`` poisons chosen iterations):

- ``train.nan_policy=stop`` (the default): exit status 3, one line naming the iteration and the
  last good checkpoint, which stays the tracker's and is where a restart resumes;
- ``skip`` (at PP=2): the poisoned steps are logged with ``skipped: true`` and change neither
  the weights, nor the optimizer state, nor the LR; ``train.max_skipped_steps`` consecutive
  skips stop the run (status 3).
"""

from __future__ import annotations

import math

import torch

from megatron_vwn.checkpoint.files import iter_dir_name
from tests.distributed.checkpoint_helpers import rows, tracker
from tests.distributed.fault_helpers import checkpoint_tensors, cli_train, error_lines, output

ITERS = 8


def test_stop_exits_3_naming_the_iteration_and_the_checkpoint_a_restart_resumes(
        tmp_path, data_cache):
    run = tmp_path / "run"
    proc = cli_train(run, 1, [f"train.iters={ITERS}", "checkpoint.save_interval=2",
                              "debug.nan_at=[5]"], data_cache)
    assert proc.returncode == 3, output(proc)
    latest = run / "checkpoints" / iter_dir_name(4)
    (line,) = error_lines(proc)
    assert "iteration 5" in line
    assert "non-finite loss nan" in line and "train.nan_policy=stop" in line
    assert f"the last good checkpoint is {latest} (iteration 4)" in line
    assert tracker(run) == 4 and not (run / "checkpoints" / iter_dir_name(5)).exists()

    proc = cli_train(run, 1, [f"train.iters={ITERS}", "checkpoint.save_interval=2"], data_cache)
    assert proc.returncode == 0, output(proc)
    assert f"resumed from {latest} at iteration 4" in proc.stdout
    train = [r for r in rows(run) if r["split"] == "train"]
    assert [r["iteration"] for r in train] == list(range(1, ITERS + 1))
    assert all(math.isfinite(r["lm_loss"]) and not r["skipped"] for r in train)


def test_skip_drops_the_update_and_stops_after_max_consecutive_skips(tmp_path, data_cache):
    run = tmp_path / "run"
    proc = cli_train(run, 2, ["train.iters=12", "parallel.pipeline=2",
                              "checkpoint.save_interval=2", "train.nan_policy=skip",
                              "train.max_skipped_steps=3", "debug.nan_at=[3,4,6,7,8]"],
                     data_cache)
    assert proc.returncode == 3, output(proc)
    (line,) = error_lines(proc)  # once, after torchrun's summary
    assert "iteration 8" in line
    assert "3 consecutive steps with a non-finite loss" in line
    assert f"the last good checkpoint is {run / 'checkpoints' / iter_dir_name(6)}" in line
    train = {r["iteration"]: r for r in rows(run) if r["split"] == "train"}
    assert sorted(train) == list(range(1, 9))
    assert [i for i, r in train.items() if r["skipped"]] == [3, 4, 6, 7, 8]
    assert all(math.isnan(train[i]["lm_loss"]) and train[i]["grad_norm"] is None
               for i in (3, 4, 6, 7, 8))
    # No LR step on a skipped step: iteration 5 runs at iteration 3's LR.
    assert train[3]["lr"] == train[4]["lr"] == train[5]["lr"] != train[2]["lr"]
    assert tracker(run) == 6

    # Steps 3 and 4 were skipped: weights and Adam moments at 4 are those at 2, bit for bit.
    at2 = checkpoint_tensors(run / "checkpoints" / iter_dir_name(2), tmp_path)
    at4 = checkpoint_tensors(run / "checkpoints" / iter_dir_name(4), tmp_path)
    at6 = checkpoint_tensors(run / "checkpoints" / iter_dir_name(6), tmp_path)
    assert at2.keys() == at4.keys() and any(k.startswith("optimizer.") for k in at2)
    for key in at2:
        assert torch.equal(at2[key], at4[key]), key
    assert all(torch.isfinite(t).all() for t in at6.values())
    assert not all(torch.equal(at4[k], at6[k]) for k in at4)  # step 5 did update
