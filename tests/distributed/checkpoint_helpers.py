"""Shared pieces of the checkpoint tests: the tiny run they train, starting ranks without waiting
(to signal or kill them), and reading ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from megatron_vwn.checkpoint.files import TRACKER
from tests.distributed.launcher import REPO, SMALL_RUN, _free_port, run_ranks

WORKER = "tests/distributed/checkpoint_worker.py"

# Validation every 3 iterations. The LR decay length is fixed so a run stopped early
# (train.iters=N) and its resumption share the schedule.
BASE = [*SMALL_RUN, "train.warmup_iters=2", "train.lr_decay_iters=40", "train.eval_interval=3",
        "train.eval_iters=2"]
COMPARED = ("iteration", "split", "lm_loss", "grad_norm", "lr")


def train(run_dir: Path, nproc: int, overrides: list[str], data_cache: str,
          logits: Path | None = None, env: dict | None = None) -> list[str]:
    """Train through the Trainer's loop (``megatron-vwn train``) at ``nproc`` ranks."""
    args = [WORKER, "train", *(["--logits", str(logits)] if logits else []), *BASE,
            f"data.cache_dir={data_cache}", f"run.dir={run_dir}", *overrides]
    return run_ranks(nproc, args, log_dir=run_dir.parent, env=env)


def logits_of(checkpoint: Path, out: Path, nproc: int, overrides: list[str], data_cache: str,
              work: Path) -> None:
    """Load ``checkpoint``'s weights at the layout of ``overrides`` and write the logits."""
    args = [WORKER, "logits", str(out), *BASE, f"data.cache_dir={data_cache}",
            f"run.dir={work}", "checkpoint.resume=never", f"checkpoint.load={checkpoint}",
            "checkpoint.weights_only=true", "train.iters=3", *overrides]
    run_ranks(nproc, args, log_dir=work.parent)


def start_ranks(nproc: int, argv: list[str], log_dir: Path,
                env: dict | None = None) -> list[subprocess.Popen]:
    """Like ``run_ranks`` but returns at once; each rank leads its own process group."""
    port = _free_port()
    procs = []
    for rank in range(nproc):
        rank_env = {
            **os.environ, **(env or {}),
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",  # the log of a killed rank is complete
        }
        log = open(log_dir / f"rank{rank}-{port}.log", "w")
        procs.append(subprocess.Popen([sys.executable, *argv], env=rank_env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      cwd=REPO))
        log.close()
    return procs


def train_argv(run_dir: Path, overrides: list[str], data_cache: str) -> list[str]:
    return [WORKER, "train", *BASE, f"data.cache_dir={data_cache}", f"run.dir={run_dir}",
            *overrides]


def kill_groups(procs: list[subprocess.Popen], sig: int = signal.SIGKILL) -> None:
    """Signal the process group of every rank still running (the rank and its helpers)."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes; on timeout every group is killed and TimeoutError raised."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"ranks did not finish in {timeout}s") from None
    finally:
        kill_groups(procs)
        for proc in procs:
            proc.wait()
    return [proc.returncode for proc in procs]


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def last_iteration(run_dir: Path) -> int:
    """The last training iteration in ``metrics.jsonl`` while it is being written (0 if none)."""
    path = run_dir / "metrics.jsonl"
    last = 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the row being written
            if row["split"] == "train":
                last = max(last, row["iteration"])
    return last


def compared(run_rows: list[dict], after: int = 0) -> list[tuple]:
    """The values a resumed run must reproduce bit for bit (timings excluded)."""
    return [tuple(r.get(k) for k in COMPARED) for r in run_rows if r["iteration"] > after]


def tracker(run_dir: Path) -> int | None:
    path = run_dir / "checkpoints" / TRACKER
    return int(path.read_text()) if path.is_file() else None


def wait_for(predicate, timeout: float, procs: list[subprocess.Popen], what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"ranks exited before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} in {timeout}s")
        time.sleep(0.01)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within 1e-5 relative to the largest logit (near-zero entries need the scale)."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)
