"""Resume is exact: 2N iterations straight == N, stop (end of run or SIGTERM/SIGUSR1), resume to
2N, row for row in ``metrics.jsonl`` (lm_loss, grad_norm, lr; bit-exact on CPU fp32). A
checkpoint written at one layout continues at another (model and optimizer state resharded), a
corrupted latest checkpoint falls back to the previous one, a model that does not fit is refused.

All runs use two ranks (data parallel 2: fully parallel save, per-rank RNG objects).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from megatron_vwn.checkpoint.files import TRACKER, iter_dir_name
from tests.distributed.checkpoint_helpers import (
    BASE,
    assert_logits_close,
    compared,
    kill_groups,
    last_iteration,
    logits_of,
    rows,
    start_ranks,
    tracker,
    train,
    train_argv,
    wait_all,
    wait_for,
)

NPROC = 2
N = 6
# Extra overrides per model family; every case gets the exact-resume test.
CASES: dict[str, list[str]] = {
    "backbone": [],
    # virtual width: GHC modules, the wide embedding, GroupNorm and the reduce resume too
    "vwn": ["model.vwn.m=2", "model.vwn.n=4"],
    # the rest of the family: mHC's mappings, AltUp's predict/correct and its wide table
    "mhc": ["model.vwn.connection=mhc", "model.vwn.n=4"],
    "altup": ["model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.dynamic=false"],
    "altup_dynamic": ["model.vwn.connection=altup", "model.vwn.n=2",  # + stream projections
                      "model.vwn.dynamic=true"],
    # warmup-stable-decay, stopped and resumed inside its decay phase (iterations 5..12)
    "wsd": ["train.lr_schedule=wsd", "train.lr_decay_iters=12", "train.lr_wsd_decay_iters=8",
            "train.lr_wsd_decay_style=cosine"],
}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_cache):
    """``straight(case)``: the run dir of 2N uninterrupted iterations (checkpoints every 3), with
    ``logits.pt`` of the final model beside it."""
    runs = {}

    def get(case: str):
        if case not in runs:
            root = tmp_path_factory.mktemp(f"straight-{case}")
            train(root / "run", NPROC, [f"train.iters={2 * N}", "checkpoint.save_interval=3",
                                        *CASES[case]], data_cache, logits=root / "logits.pt")
            runs[case] = root / "run"
        return runs[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_stop_at_n_and_resume_to_2n_is_bit_exact(case, straight, tmp_path, data_cache):
    reference = straight(case)
    run = tmp_path / "run"
    train(run, NPROC, [f"train.iters={N}", *CASES[case]], data_cache)
    assert tracker(run) == N  # saved at the end (save_interval=0)
    outputs = train(run, NPROC, [f"train.iters={2 * N}", *CASES[case]], data_cache)
    assert f"resumed from {run / 'checkpoints' / iter_dir_name(N)} at iteration {N}" in outputs[0]
    expected = compared(rows(reference))
    assert len(expected) == 2 * N + 2 * N // 3  # train rows and a validation row every 3
    assert compared(rows(run)) == expected
    assert tracker(run) == 2 * N


def test_signals_finish_the_step_save_and_exit_0_then_resume_exactly(
        straight, tmp_path, data_cache):
    reference = straight("backbone")
    run = tmp_path / "run"
    argv = train_argv(run, [f"train.iters={2 * N}"], data_cache)
    slow = {"CKPT_TEST_STEP_SLEEP": "0.25"}

    # SIGUSR1 to one rank only: all ranks agree to stop after the same step.
    procs = start_ranks(NPROC, argv, tmp_path, env=slow)
    wait_for(lambda: last_iteration(run) >= 2, 300, procs, "iteration 2")
    os.kill(procs[1].pid, signal.SIGUSR1)
    assert wait_all(procs, 300) == [0] * NPROC
    first = tracker(run)
    assert 2 <= first < 2 * N and last_iteration(run) == first

    # SIGTERM to every process of the job (what SLURM does at preemption).
    procs = start_ranks(NPROC, argv, tmp_path, env=slow)
    wait_for(lambda: last_iteration(run) >= first + 1, 300, procs, f"iteration {first + 1}")
    kill_groups(procs, signal.SIGTERM)
    assert wait_all(procs, 300) == [0] * NPROC
    second = tracker(run)
    assert first < second < 2 * N and last_iteration(run) == second

    train(run, NPROC, [f"train.iters={2 * N}"], data_cache)
    assert compared(rows(run)) == compared(rows(reference))


def test_tp1_dp2_checkpoint_gives_the_same_logits_at_tp2(straight, tmp_path, data_cache):
    reference = straight("backbone")
    out = tmp_path / "tp2.pt"
    logits_of(reference / "checkpoints", out, 2, ["parallel.tensor=2"], data_cache,
              tmp_path / "work")
    assert_logits_close(torch.load(out), torch.load(reference.parent / "logits.pt"))


def test_resume_at_another_layout_continues_the_same_training(straight, tmp_path, data_cache):
    """DP2 checkpoint -> TP2+SP: model and (plain) optimizer state reshard; the remaining
    iterations match the straight run to parity tolerance (the reductions differ)."""
    reference = straight("backbone")
    run = tmp_path / "run"
    outputs = train(run, 2, [f"train.iters={2 * N}", "parallel.tensor=2",
                             "parallel.sequence_parallel=true",
                             f"checkpoint.load={reference / 'checkpoints' / iter_dir_name(N)}"],
                    data_cache)
    assert "RNG states are not restored" in outputs[0]
    expected = [r for r in rows(reference) if r["iteration"] > N]
    got = rows(run)
    assert [(r["iteration"], r["split"]) for r in got] == [
        (r["iteration"], r["split"]) for r in expected]
    for key, rtol in (("lm_loss", 1e-5), ("grad_norm", 1e-4), ("lr", 0)):
        pairs = [(g[key], e[key]) for g, e in zip(got, expected, strict=True) if key in e]
        torch.testing.assert_close(torch.tensor([g for g, _ in pairs], dtype=torch.float64),
                                   torch.tensor([e for _, e in pairs], dtype=torch.float64),
                                   rtol=rtol, atol=0)


def test_corrupted_latest_and_missing_tracker_fall_back_exactly(straight, tmp_path, data_cache):
    reference = straight("backbone")
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    checkpoints = run / "checkpoints"
    (checkpoints / TRACKER).unlink()
    shard = sorted((checkpoints / iter_dir_name(2 * N)).glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    outputs = train(run, NPROC, [f"train.iters={2 * N}"], data_cache)
    log = outputs[0]
    assert f"tracker file {checkpoints / TRACKER} is missing" in log
    assert f"{shard} is corrupted (CRC-32 mismatch)" in log
    assert "falling back to the previous complete checkpoint" in log
    assert f"resumed from {checkpoints / iter_dir_name(9)} at iteration 9" in log
    assert compared(rows(run)) == compared(rows(reference))  # 10..12 trained once more, exactly
    assert tracker(run) == 2 * N


def test_model_that_does_not_fit_is_refused_with_the_differences(straight, tmp_path, data_cache):
    reference = straight("backbone")
    command = [sys.executable, "-m", "megatron_vwn.cli", "train", "tiny", *BASE,
               f"data.cache_dir={data_cache}", f"run.dir={tmp_path / 'run'}",
               f"checkpoint.load={reference / 'checkpoints'}",
               "model.hidden_size=128", "model.num_layers=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("megatron-vwn: error:")]
    assert f"checkpoint {reference / 'checkpoints' / iter_dir_name(2 * N)} does not fit" in line
    assert "model.hidden_size: checkpoint 64, config 128" in line
    assert "model.num_layers: checkpoint 4, config 2" in line
