"""The watchdog on its own, against a real rendezvous store (no training, a few seconds):

- a neighbour whose heartbeat stops is declared lost after ``timeout_s``: the watching process
  ends with status 4 and one line naming it (the path of a *hung* rank, which never closes its
  connections, so no collective fails at once);
- a store that goes away names its host;
- after a failed collective, the diagnosis names the ranks that went silent or recorded a
  failure, and only those.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import timedelta

from torch.distributed import TCPStore

from megatron_vwn.parallel.watchdog import Watchdog, _key
from tests.distributed.launcher import REPO, _free_port

WATCH = """
import sys, time
from torch.distributed import TCPStore
from megatron_vwn.parallel.watchdog import Watchdog, _key
port, host_store = int(sys.argv[1]), sys.argv[2] == "host"
if host_store:
    server = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    server.set(_key("heartbeat", 1), "0")  # rank 1 beat once, then went silent
Watchdog(0, 2, "127.0.0.1", port, timeout_s=2.0).start()
print("watching", flush=True)
time.sleep(120)
"""


def _watch(port: int, host_store: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", WATCH, str(port),
                             "host" if host_store else "client"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_silent_neighbour_ends_the_watching_rank_with_status_4():
    proc = _watch(_free_port(), host_store=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("megatron-vwn: error:")]
    assert "rank 1 is lost: no heartbeat for" in line and "(parallel.timeout_s=2)" in line
    assert line.endswith("stopping this rank (0)")


def test_a_store_that_goes_away_names_its_host():
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", (
        "import time; from torch.distributed import TCPStore; "
        f"s = TCPStore('127.0.0.1', {port}, is_master=True, wait_for_workers=False); "
        "print('up', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "up"
        proc = _watch(port, host_store=False)
        assert proc.stdout.readline().strip() == "watching"
        server.kill()
        _, err = proc.communicate(timeout=120)
    finally:
        server.kill()
        server.wait()
    assert proc.returncode == 4, err
    assert f"the rendezvous store at 127.0.0.1:{port} stopped answering" in err
    assert "its host, rank 0, is lost" in err


def test_diagnosis_names_the_silent_and_the_failed_ranks():
    port = _free_port()
    server = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                      timeout=timedelta(seconds=30))
    for rank in range(4):
        server.set(_key("heartbeat", rank), "0")
    server.set(_key("failed", 3), "ValueError: bad batch")
    alive = threading.Event()

    def beat():  # rank 1 stays alive; rank 2 went silent; rank 3 recorded its failure
        count = 0
        while not alive.is_set():
            count += 1
            server.set(_key("heartbeat", 1), str(count))
            time.sleep(0.05)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        watchdog = Watchdog(0, 4, "127.0.0.1", port, timeout_s=5.0)  # its thread not started
        assert watchdog.lost_ranks() == ["rank 2 is lost (its heartbeats stopped)",
                                         "rank 3 failed (ValueError: bad batch)"]
    finally:
        alive.set()
        thread.join()
