"""A rank process ends when its job does: bounded exits after a fault or a stop signal.

Three ways a rank (or something it started) could outlive a failed job, and what closes each:

- **Forked checkpoint writers.** Megatron-Core's ``torch_dist`` save forks writer processes from
  the rank (``FileSystemWriterAsync.write_preloaded_data_multiproc``). A child forked from a
  multi-threaded process (the watchdog, gloo's and the store's threads) can block on a lock that
  another thread held at the fork, and it inherits the rank's Python SIGTERM handler, which only
  records the signal: such a child ignores SIGTERM and, once the rank has exited, lives on under
  PID 1. :func:`tie_forked_children` makes the kernel send every child SIGKILL when its parent
  ends (``PR_SET_PDEATHSIG``) and gives it the default SIGTERM/SIGUSR1 behaviour.
- **Teardown after a lost peer.** Once a rank knows a peer is gone, the process groups cannot be
  torn down, and interpreter shutdown runs their C++ destructors, which may wait for work that
  involves the dead peer. :func:`exit_now` ends the process directly after the error line.
- **A stop signal while the rank cannot finish its step.** The SIGTERM/SIGUSR1 handler records
  the signal for the main thread, which acts on it after the step; a main thread blocked in C
  code never gets there. :class:`StopDeadline` sees the signal through ``signal.set_wakeup_fd``
  (written by the C-level handler at once) and ends the process, naming why, if it has not
  ended ``deadline_s`` later.

The bounds are in ``docs/reliability.md`` (fault table).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

STOP_GRACE_S = 30
"""Beyond ``parallel.timeout_s`` (the bound on any collective the step or the save waits in),
how long a rank may take after a stop signal to save and exit before it exits without saving."""

_PR_SET_PDEATHSIG = 1
_tied = False


def _child_after_fork() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: no parent-death signal to ask for
        pass
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)


def tie_forked_children() -> None:
    """Every process forked from this one from now on is killed by the kernel when this process
    ends, and a SIGTERM ends it (idempotent; Linux, elsewhere only the signal reset)."""
    global _tied
    if not _tied:
        os.register_at_fork(after_in_child=_child_after_fork)
        _tied = True


def exit_now(code: int) -> None:
    """Flush what was printed and logged, then end the process without interpreter shutdown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


class StopDeadline:
    """Ends the process ``deadline_s`` after the first stop signal unless it ended by itself,
    with status 128 + the signal's number (143 for SIGTERM) and one line from ``report(code,
    message)``; ``describe()`` completes the line (e.g. with the latest checkpoint). Installed
    from the main thread; the signal handlers themselves stay those of :class:`StopSignals`.
    """

    def __init__(self, deadline_s: float, report: Callable[[int, str], None],
                 describe: Callable[[], str] = lambda: ""):
        self.deadline_s = float(deadline_s)
        self.report = report
        self.describe = describe
        self._read_fd = self._write_fd = None
        self._previous_fd = None
        self._thread: threading.Thread | None = None

    def install(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="megatron-vwn-stop-deadline",
                                        daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        stop_signals = {int(signal.SIGTERM), int(signal.SIGUSR1)}
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return  # closed by uninstall()
            if not data:
                return
            received = next((b for b in data if b in stop_signals), None)
            if received is not None:
                break
        started = time.monotonic()
        time.sleep(self.deadline_s)
        name, code = signal.Signals(received).name, 128 + received
        self.report(code, f"received {name} {time.monotonic() - started:.0f} s ago and could not "
                    f"finish the step and save within {self.deadline_s:g} s (parallel.timeout_s "
                    f"+ {STOP_GRACE_S} s): exiting without a checkpoint{self.describe()}")
        exit_now(code)

    def uninstall(self) -> None:
        """Back to the previous wakeup fd; the watching thread ends (nothing was received) or
        keeps its deadline (a stop is under way)."""
        if self._write_fd is None:
            return
        signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
        os.close(self._write_fd)
        self._write_fd = None
