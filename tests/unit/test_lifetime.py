"""Bounded ends of a rank process (``training/lifetime.py``), each in a real child process: a
forked child dies with its parent and obeys SIGTERM; a stop signal that the main thread cannot
act on still ends the process after the deadline, naming why."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil

FORKING_PARENT = r"""
import os, signal, sys, time
from megatron_vwn.training.lifetime import tie_forked_children
signal.signal(signal.SIGTERM, lambda *_: None)  # the rank's handler: records, does not exit
tie_forked_children()
if os.fork() == 0:  # the at-fork hook has run once the child's own code runs
    print(os.getpid(), flush=True)
    time.sleep(600)  # a writer that would never finish
    os._exit(0)
sys.stdin.readline()  # until told to end
os._exit(4)  # the rank ends abruptly (watchdog, lost peer)
"""


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _forking_parent() -> tuple[subprocess.Popen, int]:
    parent = subprocess.Popen([sys.executable, "-c", FORKING_PARENT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    return parent, int(parent.stdout.readline())


def test_a_forked_child_dies_with_its_parent():
    parent, child = _forking_parent()
    try:
        assert not _gone(child, 0.5)  # alive while the parent is
        parent.stdin.write("end\n")
        parent.stdin.flush()
        assert parent.wait(10) == 4
        assert _gone(child, 5), "the forked child outlived its parent"
    finally:
        parent.kill()
        psutil.Process(child).kill() if not _gone(child, 0) else None


def test_a_forked_child_obeys_sigterm_despite_the_parents_handler():
    parent, child = _forking_parent()
    try:
        psutil.Process(child).send_signal(signal.SIGTERM)
        assert _gone(child, 5), "SIGTERM did not end the forked child"
    finally:
        parent.kill()
        parent.wait()


STUCK_RANK = r"""
import os, signal, sys
from megatron_vwn.training.lifetime import StopDeadline
signal.signal(signal.SIGTERM, lambda *_: None)  # records the stop for a step that never ends
def report(code, message):
    print(f"megatron-vwn: error: {message}", file=sys.stderr, flush=True)
StopDeadline(1.0, report, lambda: "; the latest checkpoint is none").install()
print("ready", flush=True)
read, _ = os.pipe()
os.read(read, 1)  # the main thread blocked in C code, forever
"""


def test_a_stop_signal_ends_a_stuck_rank_after_the_deadline_naming_why():
    proc = subprocess.Popen([sys.executable, "-c", STUCK_RANK], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert time.monotonic() - sent >= 1.0
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("megatron-vwn: error:")]
    assert "received SIGTERM" in line and "exiting without a checkpoint" in line, line
    assert line.endswith("the latest checkpoint is none"), line


def test_without_a_stop_signal_the_deadline_never_fires():
    proc = subprocess.Popen([sys.executable, "-c", STUCK_RANK], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        time.sleep(2.5)  # well past the 1 s deadline
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
