"""Process groups and seeds: torch.distributed + Megatron-Core ``parallel_state``."""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_vwn.config.schema import Config
from megatron_vwn.launch.env import DistEnv
from megatron_vwn.parallel.cpu import cpu_mode, enable_cpu_support


def initialize_distributed(cfg: Config, dist: DistEnv) -> None:
    """Create the world (NCCL on GPU, gloo on CPU), then TP/PP/DP groups, then seed RNGs."""
    enable_cpu_support()
    if not cpu_mode():
        torch.cuda.set_device(dist.local_rank)
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", dist.master_addr)
        os.environ.setdefault("MASTER_PORT", str(dist.master_port))
        torch.distributed.init_process_group(
            backend="gloo" if cpu_mode() else "nccl",
            rank=dist.rank,
            world_size=dist.world_size,
            timeout=datetime.timedelta(minutes=30),
        )
    par = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor,
        pipeline_model_parallel_size=par.pipeline,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline if par.vpp > 1 else None,
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


def destroy_distributed() -> None:
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
