"""Shared pieces of the fault tests (``test_faults_*.py``): ``megatron-vwn train`` as a user
starts it (``--nproc N`` through torchrun, or one process), its one error line, and the tensors
of a checkpoint read back without a process group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.distributed.checkpoint_helpers import BASE
from tests.distributed.launcher import REPO

ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO),
       "PYTHONUNBUFFERED": "1"}


def cli_command(run_dir: Path, nproc: int, overrides: list[str], data_cache: str) -> list[str]:
    nproc_args = ["--nproc", str(nproc)] if nproc > 1 else []
    return [sys.executable, "-m", "megatron_vwn.cli", "train", "tiny", *BASE,
            f"data.cache_dir={data_cache}", f"run.dir={run_dir}", *overrides, *nproc_args]


def cli_train(run_dir: Path, nproc: int, overrides: list[str], data_cache: str,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """``megatron-vwn train tiny`` with the checkpoint tests' small run; never raises on a
    non-zero exit (the tests look at it)."""
    return subprocess.run(cli_command(run_dir, nproc, overrides, data_cache),
                          env={**os.environ, **ENV}, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, start_new_session=True)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("megatron-vwn: error:")]


def output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}\n--- stderr\n" \
           f"{proc.stderr[-5000:]}"


def checkpoint_tensors(path: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint (model and optimizer state), read offline."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    loaded = torch.load(out, weights_only=False)
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
