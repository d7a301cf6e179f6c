"""Start N local ranks of a Python script with torchrun's environment variables.

Each rank runs in its own process session and the whole group is killed when the call ends, so a
hung collective or a crashed checkpoint helper never outlives its test (PLATFORM.md).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

# The small run the parity and checkpoint suites share: small enough for 2 cores, deep enough
# for PP=2 x VPP=2 (4 layers), GQA to split over TP=2; each suite adds its schedule on top.
SMALL_RUN = [
    "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.seq_length=32",
    "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=1e-3",
    "logging.wandb=off", "logging.interval=1", "data.split=90,10,0",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(nproc: int, argv: list[str], timeout: float = 600, log_dir: Path | None = None,
              env: dict | None = None) -> list[str]:
    """Run ``python argv...`` as ``nproc`` ranks; return each rank's output; raise on failure."""
    port = _free_port()
    procs, logs = [], []
    for rank in range(nproc):
        rank_env = {
            **os.environ, **(env or {}),
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO),
        }
        log_path = (log_dir or Path("/tmp")) / f"rank{rank}-{port}.log"
        log = open(log_path, "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, *argv], env=rank_env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=REPO,
        ))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish in {timeout}s")
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(2)  # let the others print their errors, then stop everyone
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise RuntimeError(
            f"ranks {failed} failed:\n" + "\n".join(f"--- rank {r}\n{outputs[r][-4000:]}"
                                                    for r in failed)
        )
    return outputs


def selected_params(session, test_name: str, keys: tuple[str, ...]) -> list[tuple]:
    """The parameter tuples of ``test_name``'s items that this pytest session runs (``-k`` and
    ``-m`` respected), so a batched launch runs only the cases someone asked for."""
    return [tuple(item.callspec.params[k] for k in keys) for item in session.items
            if getattr(item, "originalname", None) == test_name]


def run_batch(worker: str, root: Path, nproc: int, base: list[str],
              cases: dict[str, list[str]], timeout: float | None = None) -> dict[str, list[dict]]:
    """Run every case (name -> overrides on top of ``base``) in one launch of ``worker --batch``
    (``parity_worker.py``'s spec) on ``nproc`` ranks under ``root``; per case, what each rank
    saved (``out/NAME/rankR.pt``). One launch pays process start-up and imports once."""
    spec = root / "spec.json"
    spec.write_text(json.dumps({"out": str(root / "out"), "base": base, "cases": cases}))
    run_ranks(nproc, [worker, "--batch", str(spec)], log_dir=root,
              timeout=timeout or 300 + 120 * len(cases))
    return {name: [torch.load(root / "out" / name / f"rank{r}.pt") for r in range(nproc)]
            for name in cases}
