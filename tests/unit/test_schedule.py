"""LR schedules (train.lr_schedule) on Megatron-Core's OptimizerParamScheduler: each schedule's
learning rates against its closed form, the WSD fields saved and restored, a moved decay start
logged, and the refusals. The end-to-end resume of a WSD run is in
tests/distributed/test_checkpoint_resume.py (case "wsd")."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest

from megatron_vwn.config import ConfigError, load_config, validate
from megatron_vwn.optim.schedule import (
    build_scheduler,
    load_schedule_state,
    schedule_state_dict,
)

LR, MIN_LR, WARMUP, DECAY = 1.0, 0.1, 4, 24


def _train(*overrides: str):
    return load_config(None, [f"train.lr={LR}", f"train.min_lr={MIN_LR}",
                              f"train.warmup_iters={WARMUP}", f"train.lr_decay_iters={DECAY}",
                              "train.iters=30", *overrides]).train


def _optimizer():
    return SimpleNamespace(param_groups=[{"params": []}])


def _lrs(train, steps: int, start: int = 0, scheduler=None) -> list[float]:
    """The learning rate each of ``steps`` iterations trains with (read before its step)."""
    optimizer = _optimizer()
    scheduler = scheduler or build_scheduler(train, optimizer)
    if start:
        scheduler.step(start)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.step(1)
    return lrs


def _expected(schedule: str, step: int, wsd_decay: int = 0, style: str = "linear") -> float:
    if step <= WARMUP:
        return LR * step / WARMUP
    if schedule == "constant":
        return LR
    if step > DECAY:
        return MIN_LR
    ratio = (step - WARMUP) / (DECAY - WARMUP)
    if schedule == "linear":
        coeff = 1 - ratio
    elif schedule == "cosine":
        coeff = 0.5 * (1 + math.cos(math.pi * ratio))
    else:  # wsd
        start = DECAY - wsd_decay
        if step <= start:
            return LR
        r = (step - start) / wsd_decay
        coeff = {"linear": 1 - r, "cosine": 0.5 * (1 + math.cos(math.pi * r)),
                 "exponential": 2 * 0.5 ** r - 1, "minus_sqrt": 1 - math.sqrt(r)}[style]
    return MIN_LR + coeff * (LR - MIN_LR)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_follows_its_formula(schedule):
    got = _lrs(_train(f"train.lr_schedule={schedule}"), 30)
    assert got == pytest.approx([_expected(schedule, s) for s in range(30)], rel=1e-12)


@pytest.mark.parametrize("style", ["linear", "cosine", "exponential", "minus_sqrt"])
def test_wsd_is_stable_then_decays_over_its_last_iterations(style):
    got = _lrs(_train("train.lr_schedule=wsd", "train.lr_wsd_decay_iters=8",
                      f"train.lr_wsd_decay_style={style}"), 30)
    assert got == pytest.approx([_expected("wsd", s, 8, style) for s in range(30)], rel=1e-12)
    assert got[WARMUP:DECAY - 8 + 1] == [LR] * (DECAY - 8 - WARMUP + 1)  # the stable phase
    assert got[DECAY] == pytest.approx(MIN_LR)


def test_wsd_decay_defaults_to_the_last_fifth():
    train = _train("train.lr_schedule=wsd")
    assert train.wsd_decay_iters == round(0.2 * DECAY)
    scheduler = build_scheduler(train, _optimizer())
    assert scheduler.wsd_decay_steps == round(0.2 * DECAY)
    assert scheduler.lr_decay_style == "WSD" and scheduler.lr_wsd_decay_style == "linear"


def test_wsd_resume_gives_the_uninterrupted_learning_rates(caplog):
    train = _train("train.lr_schedule=wsd", "train.lr_wsd_decay_iters=8",
                   "train.lr_wsd_decay_style=minus_sqrt")
    straight = _lrs(train, 30)
    first = build_scheduler(train, _optimizer())
    first.step(18)  # inside the decay phase (it starts after 16)
    state = schedule_state_dict(first)
    assert (state["wsd_decay_steps"], state["lr_wsd_decay_style"]) == (8, "minus_sqrt")
    resumed = build_scheduler(train, _optimizer())
    with caplog.at_level(logging.WARNING):
        load_schedule_state(resumed, state)
    assert not caplog.records  # nothing changed, nothing logged
    assert straight[:18] + _lrs(train, 12, scheduler=resumed) == straight


def test_branching_the_decay_logs_the_moved_start(caplog):
    stable = _train("train.lr_schedule=wsd", "train.lr_wsd_decay_iters=8")
    scheduler = build_scheduler(stable, _optimizer())
    scheduler.step(10)
    state = schedule_state_dict(scheduler)
    longer = _train("train.lr_schedule=wsd", "train.lr_wsd_decay_iters=8",
                    "train.lr_decay_iters=40", "train.iters=40")
    branch = build_scheduler(longer, _optimizer())
    with caplog.at_level(logging.WARNING):
        load_schedule_state(branch, state)
    text = caplog.text
    assert "lr_decay_steps 24 -> 40" in text
    assert "WSD decay start moved from iteration 16 (checkpoint) to 32 (config)" in text
    assert "in the stable phase" in text
    assert branch.num_steps == 10 and branch.optimizer.param_groups[0]["lr"] == LR


@pytest.mark.parametrize("overrides, message", [
    (["train.lr_wsd_decay_iters=5"],
     "train.lr_wsd_decay_iters applies to train.lr_schedule=wsd only (got cosine)"),
    (["train.lr_schedule=wsd", "train.lr_wsd_decay_iters=21"],
     "train.lr_wsd_decay_iters (21) must be <= train.lr_decay_iters - train.warmup_iters "
     "(24 - 4 = 20)"),
    (["train.lr_schedule=wsd", "train.lr_wsd_decay_iters=0"],
     "train.lr_wsd_decay_iters (0) must be > 0"),
    (["train.lr_schedule=step"], "train.lr_schedule ('step') must be one of"),
])
def test_bad_schedules_are_refused(overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        validate(load_config(None, [f"train.warmup_iters={WARMUP}",
                                    f"train.lr_decay_iters={DECAY}", *overrides]))
