"""Process groups and seeds: torch.distributed + Megatron-Core ``parallel_state``."""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_vwn.compat.cpu import cpu_mode, enable_cpu_support
from megatron_vwn.config.schema import Config
from megatron_vwn.parallel.env import DistEnv
from megatron_vwn.parallel.watchdog import default_timeout_s, start_watchdog, stop_watchdog


def initialize_distributed(cfg: Config, dist: DistEnv, on_lost=None) -> None:
    """Create the world (NCCL on GPU, gloo on CPU), then TP/PP/DP (and expert) groups, then seed
    RNGs.

    Collectives time out after ``parallel.timeout_s``, and every rank starts the watchdog that
    ends the job naming a rank that died or hangs (``parallel/watchdog.py``); ``on_lost``
    completes its message (e.g. with the latest checkpoint).
    """
    enable_cpu_support()
    if not cpu_mode():
        torch.cuda.set_device(dist.local_rank)
    timeout_s = default_timeout_s(cfg.parallel.timeout_s)
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", dist.master_addr)
        os.environ.setdefault("MASTER_PORT", str(dist.master_port))
        torch.distributed.init_process_group(
            backend="gloo" if cpu_mode() else "nccl",
            rank=dist.rank,
            world_size=dist.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        start_watchdog(dist.rank, dist.world_size, os.environ["MASTER_ADDR"],
                       int(os.environ["MASTER_PORT"]), timeout_s, on_lost)
    par = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor,
        pipeline_model_parallel_size=par.pipeline,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline if par.vpp > 1 else None,
        expert_model_parallel_size=par.expert,
        expert_tensor_parallel_size=par.etp,
    )
    set_seed(cfg.train.seed)


def set_seed(seed: int) -> None:
    """Python, numpy and torch RNGs, plus Megatron's tracked model-parallel streams.

    Weight initialisation does not depend on these (see ``model.layout``); dropout does.
    """
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed + 100 * pp_rank)
    np.random.seed(seed + 100 * pp_rank)
    torch.manual_seed(seed + 100 * pp_rank)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed(healthy: bool = True) -> None:
    """Tear down; ``healthy=False`` (a rank is lost) skips everything that needs the peers."""
    stop_watchdog()
    if healthy and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every heartbeat has stopped before the store host leaves
    parallel_state.destroy_model_parallel()
    if healthy and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
