"""Processes a test leaves behind: a rank (or a process it forked) of a run that has ended.

A process belongs to a test when its command line names a path under the test's own directory
(every run directory, ``run.dir=...``, lives there). After a fault the rank processes must end
within a stated bound (docs/reliability.md); :func:`survivors` waits that long, so a test can
assert that nothing is left, and :func:`kill_survivors` is the suite's clean-up, which reports
what it had to kill.
"""

from __future__ import annotations

import os
import time

import psutil


def _matching(marker: str) -> list[psutil.Process]:
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.pid != me and marker in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def survivors(marker: str, within_s: float = 0.0) -> list[str]:
    """``pid ppid cmdline`` of every process whose command line contains ``marker`` and that is
    still alive after waiting up to ``within_s`` for them to end."""
    deadline = time.monotonic() + within_s
    while True:
        left = _matching(marker)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    described = []
    for proc in left:
        try:
            described.append(f"pid {proc.pid} (parent {proc.ppid()}): "
                             f"{' '.join(proc.cmdline())[:300]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return described


def kill_survivors(marker: str, within_s: float) -> list[str]:
    """Wait up to ``within_s``, then SIGKILL whatever still names ``marker``; what was killed."""
    left = survivors(marker, within_s)
    for proc in _matching(marker):
        try:
            proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return left
