"""Faults that end a run on purpose, and the NaN/Inf policy (docs/reliability.md).

A :class:`TrainingFault` is raised on every rank alike (the ranks agree before raising) and
ends the process with its own exit status and one ``megatron-vwn: error:`` line from the
reporting rank, never a traceback:

=====  ==========================================================================
 3     a non-finite loss or gradient norm (``train.nan_policy``)
 4     a rank was lost (``megatron_vwn.parallel.watchdog``)
 5     a checkpoint could not be saved (``checkpoint.on_save_error=stop``)
=====  ==========================================================================

The NaN/Inf guard: after forward/backward the step's loss (already reduced, the same on every
rank) and the global gradient norm are checked; if either is not finite the optimizer update is
dropped through Megatron-Core's own "found inf" path (``prepare_grads`` returning True, as its
fp16 loss scaler does), so the weights, the optimizer state and the LR schedule stay as they
were. The finiteness of the norm costs one extra gradient-norm reduction per step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from megatron_vwn.config.schema import DebugConfig, TrainConfig
from megatron_vwn.parallel.faults import LostRank, NonFiniteLoss, TrainingFault, any_rank
from megatron_vwn.parallel.watchdog import current_watchdog

FAULT_FILE_ENV = "MVWN_FAULT_FILE"
"""Set by ``megatron-vwn train --nproc``: the reporting rank writes its exit status and line
there, so the launching process exits with them (torchrun itself only knows "failed": 1)."""

logger = logging.getLogger(__name__)


def record_fault(exit_code: int, message: str) -> None:
    """Leave the exit status and line for the launching process (first writer wins)."""
    path = os.environ.get(FAULT_FILE_ENV)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(f"{exit_code}\n{message}\n")


def report_fault(exit_code: int, message: str) -> None:
    """The one ``megatron-vwn: error:`` line: printed here, or, under ``train --nproc``, left
    for the launching process, which prints it once after torchrun's failure summary."""
    import sys

    if os.environ.get(FAULT_FILE_ENV):
        record_fault(exit_code, message)
    else:
        print(f"megatron-vwn: error: {message}", file=sys.stderr, flush=True)


def read_fault(path: str) -> tuple[int, str] | None:
    """What :func:`record_fault` left, or None."""
    try:
        code, message = open(path).read().split("\n", 1)
        return int(code), message.strip()
    except (OSError, ValueError):
        return None


def launch_reporting_faults(command: list[str]) -> int:
    """Run the local ranks (``torchrun`` ``command``); exit with the ranks' fault status and
    repeat their line last, after torchrun's own failure summary."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="megatron-vwn-") as tmp:
        path = os.path.join(tmp, "fault")
        status = subprocess.call(command, env={**os.environ, FAULT_FILE_ENV: path})
        fault = read_fault(path) if status != 0 else None
    if fault is None:
        return status
    code, message = fault
    print(f"megatron-vwn: error: {message}", file=sys.stderr)
    return code


def _reporting_rank() -> bool:
    import torch

    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


@contextlib.contextmanager
def naming_lost_ranks(latest: Callable[[], str]) -> Iterator[None]:
    """Turn a failed collective into :class:`LostRank` naming the ranks that went away.

    Any other exception is recorded for the other ranks' diagnosis and re-raised. ``latest``
    describes the checkpoint a restart resumes from.
    """
    try:
        yield
    except TrainingFault:
        raise
    except Exception as exc:
        watchdog = current_watchdog()
        if watchdog is None:
            raise
        reasons = _diagnose(watchdog) if isinstance(exc, RuntimeError) else []
        if not reasons:
            watchdog.mark_failed(exc)
            raise
        raise LostRank(f"{'; '.join(reasons)}: the job stops (this rank saw "
                       f"{type(exc).__name__}: {str(exc)[:160]}); the latest checkpoint is "
                       f"{latest()}, a restart resumes from it") from exc


def lost_rank_reporter(latest: Callable[[], str]) -> Callable[[str], str]:
    """The watchdog's ``on_lost``: add the latest checkpoint, report the line."""
    def report(message: str) -> str:
        message = f"{message}; the latest checkpoint is {latest()}, a restart resumes from it"
        report_fault(LostRank.exit_code, message)
        return message
    return report


class RunGuard:
    """Around one rank's run: names lost ranks, and tears the process groups down as far as
    the fault allows (a lost peer: nothing that needs it)."""

    def __init__(self):
        self.latest: Callable[[], str] = lambda: "unknown (the run did not start)"

    @contextlib.contextmanager
    def guard(self) -> Iterator[RunGuard]:
        from megatron_vwn.config.errors import ConfigError
        from megatron_vwn.parallel.distributed import destroy_distributed

        healthy = True
        try:
            with naming_lost_ranks(lambda: self.latest()):
                yield self
        except LostRank:
            healthy = False
            raise
        except (TrainingFault, ConfigError):
            raise
        except BaseException:
            healthy = False  # a bug on this rank: the peers may be mid-collective
            raise
        finally:
            destroy_distributed(healthy)


def _diagnose(watchdog) -> list[str]:
    """``watchdog.lost_ranks()``, undisturbed by the SIGTERM a launcher sends the survivors once
    it sees a rank die (torchrun, srun: a grace period, then SIGKILL)."""
    import signal

    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM,
                                                                     signal.SIGUSR1)}
    try:
        return watchdog.lost_ranks()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def guard_optimizer(optimizer) -> None:
    """Make ``optimizer.step()`` drop any update whose global gradient norm is not finite.

    Megatron-Core's ``step()`` returns ``(False, None, None)`` without touching parameters when
    ``prepare_grads()`` reports an inf/NaN; this wraps that method (on the instance) with a
    check of the gradient norm over all model-parallel (and, for the distributed optimizer,
    data-parallel) ranks, agreed by every rank.
    """
    inner = optimizer.prepare_grads

    def prepare_grads() -> bool:
        found_inf = inner()
        norm = float(optimizer.get_grad_norm())
        return any_rank(found_inf or not math.isfinite(norm))

    optimizer.prepare_grads = prepare_grads


@dataclass
class NanPolicy:
    """``train.nan_policy`` and ``train.max_skipped_steps``; ``debug.nan_at`` for tests."""

    policy: str
    max_skipped: int
    nan_at: frozenset[int]
    consecutive: int = 0

    @classmethod
    def of(cls, train: TrainConfig, debug: DebugConfig) -> NanPolicy:
        return cls(train.nan_policy, train.max_skipped_steps, frozenset(debug.nan_at))

    def inject(self, iteration: int) -> bool:
        """Whether ``debug.nan_at`` asks for a NaN loss at ``iteration`` (1-based)."""
        return iteration in self.nan_at

    def check(self, iteration: int, loss: float, skipped: bool, last_checkpoint: str) -> None:
        """After step ``iteration``: raise :class:`NonFiniteLoss` when the run must stop.

        ``skipped`` says the update was dropped (a non-finite loss or gradient norm); the
        decision only uses values every rank shares, so all ranks raise or none does.
        """
        if not skipped:
            self.consecutive = 0
            return
        what = f"loss {loss}" if not math.isfinite(loss) else "gradient norm"
        where = f"the last good checkpoint is {last_checkpoint}"
        if self.policy == "stop":
            raise NonFiniteLoss(
                f"iteration {iteration}: non-finite {what}; the update was not applied and "
                f"train.nan_policy=stop ends the run; {where}, a restart resumes from it",
                report=_reporting_rank())
        self.consecutive += 1
        logger.warning("iteration %d: non-finite %s; update skipped (%d in a row, "
                       "train.max_skipped_steps=%d)", iteration, what, self.consecutive,
                       self.max_skipped)
        if self.consecutive >= self.max_skipped:
            raise NonFiniteLoss(
                f"iteration {iteration}: {self.consecutive} consecutive steps with a non-finite "
                f"loss or gradient norm (train.max_skipped_steps={self.max_skipped}); {where}, "
                f"a restart resumes from it", report=_reporting_rank())
