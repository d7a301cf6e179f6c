"""Learning-rate schedules on Megatron-Core's ``OptimizerParamScheduler`` (docs/scale.md).

``train.lr_schedule`` maps onto its ``lr_decay_style``: ``cosine`` and ``linear`` decay from
``train.lr`` to ``train.min_lr`` over ``train.lr_decay_iters``, ``constant`` stays at ``train.lr``
after the warmup, ``wsd`` is ``"WSD"`` with ``wsd_decay_steps`` and ``lr_wsd_decay_style``. Every
schedule starts with a linear warmup from 0 over ``train.warmup_iters``.

Megatron-Core's ``state_dict`` leaves out the two WSD fields; :func:`schedule_state_dict` adds
them, so a checkpoint records the whole schedule it was trained with. On resume the config's
schedule is used (a run can be extended, or a WSD run branch its decay from a stable-phase
checkpoint); every value that differs from the checkpoint's is logged, the WSD decay start by
name.
"""

from __future__ import annotations

import logging

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_vwn.config.schema import TrainConfig

logger = logging.getLogger(__name__)

DECAY_STYLES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}
"""``train.lr_schedule`` -> Megatron-Core's ``lr_decay_style``."""
WSD_KEYS = ("wsd_decay_steps", "lr_wsd_decay_style")
"""Scheduler fields Megatron-Core's ``state_dict`` omits (saved here)."""


def build_scheduler(train: TrainConfig, optimizer) -> OptimizerParamScheduler:
    """Linear warmup from 0 to ``train.lr``, then ``train.lr_schedule``; one step per
    iteration."""
    wsd = train.lr_schedule == "wsd"
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.warmup_iters,
        lr_decay_steps=max(train.decay_iters, train.warmup_iters + 1),
        lr_decay_style=DECAY_STYLES[train.lr_schedule],
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=train.iters,
        wd_incr_style="constant",
        wsd_decay_steps=train.wsd_decay_iters if wsd else None,
        lr_wsd_decay_style=train.lr_wsd_decay_style if wsd else None,
    )


def schedule_state_dict(scheduler: OptimizerParamScheduler) -> dict:
    """Megatron-Core's scheduler state plus the WSD fields it leaves out."""
    return {**scheduler.state_dict(), **{key: getattr(scheduler, key) for key in WSD_KEYS}}


def wsd_decay_start(state: dict) -> int | None:
    """Iteration after which a WSD schedule leaves its stable phase; None for other schedules."""
    if state.get("lr_decay_style") != "WSD" or state.get("wsd_decay_steps") is None:
        return None
    return state["lr_decay_steps"] - state["wsd_decay_steps"]


def load_schedule_state(scheduler: OptimizerParamScheduler, state: dict) -> None:
    """Continue the schedule at the saved step with the config's values; log what changed."""
    current = schedule_state_dict(scheduler)
    ignored = {"num_steps"}
    if current["wd_incr_style"] == "constant":
        ignored.add("wd_incr_steps")
    changed = {k: (v, current[k]) for k, v in state.items()
               if k not in ignored and k in current and current[k] != v}
    if changed:
        logger.warning("LR schedule differs from the checkpoint's; using the config's: %s",
                       ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
    saved_start, start = wsd_decay_start(state), wsd_decay_start(current)
    if start is not None and saved_start != start:
        where = ("in the stable phase" if state["num_steps"] <= start
                 else "already past the new decay start: the learning rate jumps")
        before = ("a schedule without one" if saved_start is None
                  else f"iteration {saved_start}")
        logger.warning("WSD decay start moved from %s (checkpoint) to %d (config); resuming at "
                       "step %d, %s", before, start, state["num_steps"], where)
    override = scheduler.override_opt_param_scheduler
    scheduler.override_opt_param_scheduler = True
    try:
        scheduler.load_state_dict(state)
    finally:
        scheduler.override_opt_param_scheduler = override
