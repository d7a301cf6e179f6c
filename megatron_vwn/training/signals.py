"""Preemption: SIGTERM or SIGUSR1 -> finish the step, save a checkpoint, exit 0.

The handler only records the signal. After every step all ranks agree (one all-reduce of a flag)
whether any of them received one, so a signal that reaches the ranks at different moments, or
only some of them, still stops every rank after the same step. A SLURM job that asks for a
signal before its time limit (``#SBATCH --signal=B:USR1@120`` or ``scancel --signal=TERM``) thus
ends with a checkpoint and exit status 0 and can requeue itself; ``checkpoint.resume=auto``
continues it.
"""

from __future__ import annotations

import logging
import signal

import torch

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Installs the handlers (main thread) and answers "stop now?" identically on every rank."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            logger.warning("received %s: stopping after this step with a checkpoint",
                           self.received.name)

    def stop_requested(self) -> bool:
        """True on every rank when any rank has received a stop signal (a collective)."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32,
                            device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
