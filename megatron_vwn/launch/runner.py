"""The sweep runner: a plan's runs trained here one after another, submitted to SLURM as job
chains, or printed (docs/runs.md).

A plan is a list of named runs, each a training config with overrides (``train_args``) and the
run directory those overrides name. The width sweep (:func:`megatron_vwn.launch.sweep.plan_sweep`)
and the depth-width shape sweep (:func:`megatron_vwn.studies.shape_sweep.plan_shape_sweep`) are
plans; both are started by :func:`run_sweep`, and each writes its own manifest into the sweep
directory (:mod:`megatron_vwn.runs.sweeps`). Every SLURM job is ``slurm/train.sbatch`` with the
site settings (:mod:`megatron_vwn.launch.site`).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.loader import load_config
from megatron_vwn.launch.site import SbatchCommand, SiteConfig, sbatch_command
from megatron_vwn.runs.rows import reached

logger = logging.getLogger(__name__)

_PREVIOUS = "PREVIOUS_JOB_ID"  # stands for the job id of the chain's previous job


class PlannedRun(Protocol):
    """One run of a plan: what the runner needs of it."""

    name: str
    run_dir: str
    train_args: list[str]
    """``[CONFIG, key=value, ...]`` as ``megatron-vwn train`` takes them."""
    job_ids: list[str]
    """Filled in by a submission (a dry run leaves it empty)."""

    def describe(self) -> str:
        """What distinguishes the run within its plan, for the progress log."""


@dataclass
class Launch:
    """How to start a plan: ``submit`` (SLURM job chains, or their sbatch lines with
    ``dry_run``), ``local`` (here, one run after another, ``nproc`` ranks each) or ``print`` (the
    ``megatron-vwn train`` command lines)."""

    mode: Literal["submit", "local", "print"]
    site: SiteConfig | None = None
    chain: int = 1
    dry_run: bool = False
    nproc: int = 1


def run_sweep(runs: Sequence[PlannedRun], launch: Launch) -> list[int]:
    """Start every run of a plan as ``launch`` says; returns an exit code per run (0 for a run
    submitted, printed or found finished already)."""
    if launch.mode == "submit":
        assert launch.site is not None, "a submission needs site settings"
        for run in runs:
            run.job_ids = submit_chain(launch.site, run.name, run.train_args, launch.chain,
                                       launch.dry_run)
        return [0] * len(runs)
    if launch.mode == "print":
        for run in runs:
            print("megatron-vwn train " + " ".join(run.train_args))
        return [0] * len(runs)
    return [_train_here(run, index, len(runs), launch.nproc)
            for index, run in enumerate(runs, start=1)]


def _train_here(run: PlannedRun, index: int, total: int, nproc: int) -> int:
    """``megatron-vwn train`` of one run in a child process; a run whose rows already reach
    ``train.iters`` is skipped, so an interrupted sweep continues where it stopped."""
    cfg = load_config(run.train_args[0], run.train_args[1:])
    if reached(run.run_dir, cfg.train.iters):
        logger.info("[%d/%d] %s: finished already, skipped", index, total, run.name)
        return 0
    command = [sys.executable, "-m", "megatron_vwn", "train", *run.train_args]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    logger.info("[%d/%d] %s: %s", index, total, run.name, run.describe())
    tick = time.monotonic()
    code = subprocess.call(command)
    logger.info("[%d/%d] %s: exit %d after %.0f s", index, total, run.name, code,
                time.monotonic() - tick)
    return code


def submit_chain(site: SiteConfig, job_name: str, train_args: list[str], chain: int,
                 dry_run: bool) -> list[str]:
    """Submit (or print) ``chain`` jobs of one run; returns the job ids (dry run: none)."""
    commands: list[SbatchCommand] = []
    for link in range(chain):
        dependency = f"afterany:{_PREVIOUS}" if link else None
        commands.append(sbatch_command(site, job_name, train_args, dependency=dependency,
                                       requeue=site.requeue and chain == 1))
    if dry_run:
        var = "JOB_" + "".join(c if c.isalnum() else "_" for c in job_name)
        for link, command in enumerate(commands):
            line = command.shell().replace(f"afterany:{_PREVIOUS}", f"afterany:${var}")
            print(f"{var}=$({line})" if chain > 1 and link < chain - 1 else line)
        return []
    Path(site.log_dir).mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    for command in commands:
        argv = [a.replace(_PREVIOUS, ids[-1]) if ids else a for a in command.argv]
        ids.append(_sbatch(argv, command.env))
    print(f"{job_name}: submitted job{'s' if len(ids) > 1 else ''} {' '.join(ids)} "
          f"(log {site.log_dir}/{job_name}-<jobid>.out)")
    return ids


def _sbatch(argv: list[str], env: dict[str, str]) -> str:
    if shutil.which(argv[0]) is None:
        raise ConfigError("sbatch not found: run this on a SLURM login node (or use --dry-run)")
    proc = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()} | "
                          f"{shlex.join(argv)}")
    return proc.stdout.strip().split(";")[0]
