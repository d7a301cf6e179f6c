"""The training loop's hooks: what runs after every optimizer step (docs/training_loop.md).

The loop (:func:`run_loop`, which :meth:`megatron_vwn.training.trainer.Trainer.train` runs)
takes a step, advances :class:`LoopState` and calls ``on_step_end(state, result)`` of every hook
in list order; a hook that ends the run sets ``state.stop`` (the loop stops after the remaining
hooks ran) or raises a :class:`~megatron_vwn.training.faults.TrainingFault`. The order of the
list is the order of a step's side effects, which the metrics rows and checkpoints rely on:

    TrainLog -> NanGuard -> Validation -> InteractionMetrics -> Checkpointing

The hooks receive what they use when they are built, never the trainer; the trainer owns (and
closes) the resources they share: the metrics writer and the checkpoint manager.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_vwn.checkpoint import CheckpointManager, RunState
from megatron_vwn.config.schema import TrainConfig
from megatron_vwn.training.evaluation import HeldOut
from megatron_vwn.training.faults import NanPolicy
from megatron_vwn.training.metrics import MetricsWriter
from megatron_vwn.training.moe_metrics import MoEMonitor
from megatron_vwn.training.signals import StopSignals
from megatron_vwn.training.step import Schedule, StepResult

logger = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Where the run is; the loop advances it, hooks read it (and a few write it)."""

    iteration: int
    """Optimizer steps taken (after ``on_step_end``'s step: that step's number, 1-based)."""
    start_iteration: int
    """The iteration this process started (or resumed) at."""
    total_iters: int
    global_batch_size: int
    seq_length: int
    consumed_valid_samples: int = 0
    step_time_s: float = 0.0
    """Wall time of the last step (synchronised with the GPU)."""
    stop: bool = False
    """Set by a hook: the loop ends after this step's hooks."""

    @property
    def last(self) -> bool:
        return self.iteration == self.total_iters

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def consumed_tokens(self) -> int:
        return self.iteration * self.tokens_per_iteration

    def run_state(self) -> RunState:
        """What a checkpoint needs to continue the run exactly (besides model and optimizer)."""
        return RunState(
            iteration=self.iteration,
            consumed_train_samples=self.iteration * self.global_batch_size,
            consumed_valid_samples=self.consumed_valid_samples,
        )


class Hook(Protocol):
    """One concern of the training loop."""

    def on_step_end(self, state: LoopState, result: StepResult) -> None: ...


def run_loop(state: LoopState, step: Callable[[], StepResult], hooks: list[Hook]) -> None:
    """Steps until ``state.total_iters`` or until a hook sets ``state.stop``; after each step,
    every hook in order."""
    while state.iteration < state.total_iters:
        tick = time.perf_counter()
        result = step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        state.step_time_s = time.perf_counter() - tick
        state.iteration += 1
        for hook in hooks:
            hook.on_step_end(state, result)
        if state.stop:
            break


class TrainLog:
    """A ``train`` row of ``metrics.jsonl`` every ``logging.interval`` steps and after the last:
    the window's mean losses and step time, throughput, and the MoE monitor's keys."""

    def __init__(self, metrics: MetricsWriter, interval: int, flops_per_token: float,
                 world_size: int, moe_monitor: MoEMonitor):
        self.metrics = metrics
        self.interval = interval
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.moe_monitor = moe_monitor
        self.window: list[tuple[dict[str, float], float]] = []

    def on_step_end(self, state: LoopState, result: StepResult) -> None:
        self.window.append((result.losses, state.step_time_s))
        if state.iteration % self.interval and not state.last:
            return
        window = self.window
        mean_time = sum(t for _, t in window) / len(window)
        tokens_per_s = state.tokens_per_iteration / mean_time
        self.metrics.log_train({
            "iteration": state.iteration,
            "consumed_tokens": state.consumed_tokens,
            **{key: sum(losses[key] for losses, _ in window) / len(window)
               for key in result.losses},
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "iter_time_s": mean_time,
            "tokens_per_s": tokens_per_s,
            "tflops_per_s_per_rank":
                tokens_per_s * self.flops_per_token / self.world_size / 1e12,
            "skipped": result.skipped,
            **self.moe_monitor.collect(steps=len(window)),
        }, start_iteration=state.start_iteration)
        window.clear()


class NanGuard:
    """``train.nan_policy``: ends the run (exit status 3) on a non-finite step when the policy
    says so (docs/reliability.md)."""

    def __init__(self, policy: NanPolicy, checkpoints: CheckpointManager):
        self.policy = policy
        self.checkpoints = checkpoints

    def on_step_end(self, state: LoopState, result: StepResult) -> None:
        self.policy.check(state.iteration, result.lm_loss, result.skipped,
                          self.checkpoints.describe_latest())


class Validation:
    """A ``valid`` row every ``train.eval_interval`` steps and after the last: token-weighted
    mean losses over the held-out batches (``train.eval_mode``)."""

    def __init__(self, held_out: HeldOut, model: list, schedule: Schedule, train: TrainConfig,
                 metrics: MetricsWriter):
        self.held_out = held_out
        self.model = model
        self.schedule = schedule
        self.train = train
        self.metrics = metrics

    def on_step_end(self, state: LoopState, result: StepResult) -> None:
        if state.iteration % self.train.eval_interval == 0 or state.last:
            losses, _ = self.held_out.score(self.model, self.schedule)
            state.consumed_valid_samples += self.train.eval_iters * self.train.global_batch_size
            self.metrics.log_valid({
                "iteration": state.iteration,
                "consumed_tokens": state.consumed_tokens,
                **losses,
            })


class Checkpointing:
    """Saves when ``checkpoint.save_interval`` is due, after the last step, or on SIGTERM /
    SIGUSR1 (then stops the run); otherwise lets a finished asynchronous save complete."""

    def __init__(self, checkpoints: CheckpointManager, signals: StopSignals, model: list,
                 optimizer, scheduler):
        self.checkpoints = checkpoints
        self.signals = signals
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler

    def on_step_end(self, state: LoopState, result: StepResult) -> None:
        stop = self.signals.stop_requested()
        if stop or state.last or self.checkpoints.due(state.iteration):
            self.checkpoints.save(state.run_state(), self.model, self.optimizer, self.scheduler,
                                  final=stop or state.last)
        else:
            self.checkpoints.poll()
        if stop:
            received = self.signals.received
            logger.info("stopping at iteration %d on %s (checkpoint saved)", state.iteration,
                        received.name if received else "another rank's signal")
            state.stop = True
