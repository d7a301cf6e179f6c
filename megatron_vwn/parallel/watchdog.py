"""A dead or hung rank ends the job within ``parallel.timeout_s``, naming the rank.

Every rank runs one daemon thread with its own client of the rendezvous store (torchrun's agent
store, or the one rank 0 hosts under a plain ``RANK``/``WORLD_SIZE`` or ``srun`` launch). Every
``interval_s`` it bumps the rank's heartbeat counter and reads the counter of one neighbour
(rank + 1, in a ring: O(world) store traffic in all):

- a neighbour whose counter has not moved for ``timeout_s`` (killed, frozen, stuck in a hung
  collective while its thread is also stuck) is *lost*: the thread logs it, records it in the
  store and ends this process with :data:`EXIT_LOST_RANK` (the main thread may be blocked in a
  collective that will never return); the launcher (torchrun, ``srun --kill-on-bad-exit``) then
  stops the rest;
- a store that stops answering means its host is gone (rank 0, or node 0's torchrun agent).

When a collective fails in the main thread (gloo notices a closed connection at once; NCCL
with async error handling after its timeout), :func:`lost_ranks` looks at *all* heartbeats
twice, a few intervals apart, and names the ranks whose counters stopped or that recorded a
failure, so the error the user sees says which rank went away rather than a socket address.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time

logger = logging.getLogger(__name__)

EXIT_LOST_RANK = 4
_PREFIX = "megatron_vwn/watchdog"


def default_timeout_s(timeout_s: int | None) -> int:
    """``parallel.timeout_s``: None means 600 s with CUDA (Megatron-LM's default distributed
    timeout; big checkpoints and first data-index builds fit), 300 s on CPU."""
    if timeout_s is not None:
        return timeout_s
    import torch

    return 600 if torch.cuda.is_available() else 300


def _key(kind: str, rank: int | str) -> str:
    return f"{_PREFIX}/{kind}/{rank}"


class Watchdog:
    """Heartbeats of this rank; the lost-peer detector (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, host: str, port: int, timeout_s: float,
                 on_lost=None):
        from torch.distributed import TCPStore

        self.rank, self.world_size = rank, world_size
        self.timeout_s = float(timeout_s)
        self.interval_s = max(0.2, min(2.0, self.timeout_s / 10))
        self.address = f"{host}:{port}"
        self.on_lost = on_lost
        self._store = TCPStore(host, port, is_master=False, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=max(5.0, self.timeout_s)))
        self._stop = threading.Event()
        self._beats = 0
        self._store.set(_key("heartbeat", rank), "0")
        self._thread = threading.Thread(target=self._run, name="megatron-vwn-watchdog",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s + 5)

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        neighbour = (self.rank + 1) % self.world_size
        last_value, last_change = None, time.monotonic()
        while not self._stop.wait(self.interval_s):
            try:
                self._beats += 1
                self._store.set(_key("heartbeat", self.rank), str(self._beats))
                value = self._read(_key("heartbeat", neighbour))
            except Exception as exc:  # noqa: BLE001 - any store failure means its host is gone
                if self._stop.is_set():
                    return
                self._lost(self._store_gone(exc))
                return
            now = time.monotonic()
            if value != last_value:
                last_value, last_change = value, now
            elif now - last_change > self.timeout_s:
                self._lost(f"rank {neighbour} is lost: no heartbeat for {now - last_change:.0f} s "
                           f"(parallel.timeout_s={self.timeout_s:g})")
                return

    def _read(self, key: str) -> str | None:
        if not self._store.check([key]):
            return None
        return self._store.get(key).decode()

    def _store_gone(self, exc: BaseException) -> str:
        host = ("node 0's torchrun agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE")
                == "True" else "rank 0")
        return (f"the rendezvous store at {self.address} stopped answering ({type(exc).__name__}):"
                f" its host, {host}, is lost")

    def _lost(self, reason: str) -> None:
        """From the thread: report and end this process (the main thread may be stuck)."""
        try:
            self._store.set(_key("lost", self.rank), reason)
        except Exception:  # noqa: BLE001,S110 - the store may be what is gone
            pass
        message = f"{reason}; stopping this rank ({self.rank})"
        if self.on_lost is not None:
            message = self.on_lost(message)  # reports the line
        else:
            print(f"megatron-vwn: error: {message}", file=sys.stderr, flush=True)
        logger.error(message)
        sys.stdout.flush()
        os._exit(EXIT_LOST_RANK)

    # ---------------------------------------------------------------- after an error

    def mark_failed(self, exc: BaseException) -> None:
        """Record that this rank fails with ``exc`` (read by the other ranks' diagnosis)."""
        try:
            self._store.set(_key("failed", self.rank), f"{type(exc).__name__}: {exc}"[:300])
        except Exception:  # noqa: BLE001,S110 - best effort: the store may be gone
            pass

    def lost_ranks(self) -> list[str]:
        """After a failed collective: one reason per rank that failed or went silent (all ranks
        are looked at; takes about three heartbeat intervals). Empty if everyone is alive."""
        try:
            first = self._snapshot()
            time.sleep(2.5 * self.interval_s)
            second = self._snapshot()
        except Exception as exc:  # noqa: BLE001 - the store's host is gone
            return [self._store_gone(exc)]
        reasons = []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            failed = self._read_quiet(_key("failed", rank))
            if failed is not None:
                reasons.append(f"rank {rank} failed ({failed})")
            elif first[rank] == second[rank]:
                reasons.append(f"rank {rank} is lost (its heartbeats stopped)")
        return reasons

    def _snapshot(self) -> list[str | None]:
        return [self._read(_key("heartbeat", rank)) for rank in range(self.world_size)]

    def _read_quiet(self, key: str) -> str | None:
        try:
            return self._read(key)
        except Exception:  # noqa: BLE001 - best effort
            return None


_current: Watchdog | None = None


def start_watchdog(rank: int, world_size: int, host: str, port: int, timeout_s: float,
                   on_lost=None) -> Watchdog | None:
    """Start this rank's watchdog (none for a single process). ``on_lost(message)`` reports
    the error line and returns the message to log."""
    global _current
    if world_size < 2:
        return None
    _current = Watchdog(rank, world_size, host, port, timeout_s, on_lost)
    _current.start()
    return _current


def current_watchdog() -> Watchdog | None:
    return _current


def stop_watchdog() -> None:
    """Stop the heartbeats (call on every rank before the process group goes away)."""
    global _current
    if _current is not None:
        _current.stop()
        _current = None
