"""Held-out evaluation (``train.eval_mode``): fixed scores the same tokens at every evaluation,
so two runs that differ only in ``train.eval_interval`` log the same validation losses at the
iterations both evaluate; rolling reads new tokens each time (and so differs), and resumes
bit-exactly through the checkpoint's ``consumed_valid_samples``.

Two ranks (data parallel 2), the checkpoint tests' small run.
"""

from __future__ import annotations

from tests.distributed.checkpoint_helpers import compared, rows, train

NPROC = 2
ITERS = 8


def _valid(run_dir) -> dict[int, dict]:
    return {r["iteration"]: r for r in rows(run_dir) if r["split"] == "valid"}


def _two_cadences(tmp_path, data_cache, mode: str) -> tuple[dict, dict]:
    runs = []
    for interval in (2, 4):
        run = tmp_path / f"{mode}-every{interval}"
        train(run, NPROC, [f"train.iters={ITERS}", f"train.eval_interval={interval}",
                           f"train.eval_mode={mode}"], data_cache)
        runs.append(_valid(run))
    return runs[0], runs[1]


def test_fixed_evaluation_is_the_same_whatever_the_eval_interval(tmp_path, data_cache):
    every2, every4 = _two_cadences(tmp_path, data_cache, "fixed")
    assert sorted(every2) == [2, 4, 6, 8] and sorted(every4) == [4, 8]
    for iteration in (4, 8):
        assert every2[iteration]["lm_loss"] == every4[iteration]["lm_loss"]
    # the loss falls on the same tokens (training helps the held-out set)
    assert every2[8]["lm_loss"] < every2[2]["lm_loss"]


def test_rolling_evaluation_reads_other_tokens_and_resumes_exactly(tmp_path, data_cache):
    every2, every4 = _two_cadences(tmp_path, data_cache, "rolling")
    # the 4-cadence run's second evaluation reads the batches the 2-cadence run read second
    assert every2[4]["lm_loss"] != every4[4]["lm_loss"]
    straight = tmp_path / "rolling-every2"
    resumed = tmp_path / "rolling-resumed"
    overrides = ["train.eval_interval=2", "train.eval_mode=rolling"]
    # stop at an evaluation iteration (a run's end also evaluates, which moves the stream)
    train(resumed, NPROC, ["train.iters=4", *overrides], data_cache)
    train(resumed, NPROC, [f"train.iters={ITERS}", *overrides], data_cache)
    assert compared(rows(resumed)) == compared(rows(straight))
    assert sorted(_valid(resumed)) == [2, 4, 6, 8]
