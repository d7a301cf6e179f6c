"""Who am I? Rank resolution from torchrun, SLURM or a plain single process, in one place."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_dist_env() -> DistEnv:
    """torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` first, then SLURM's task variables
    (one ``srun`` task per GPU), else a single local process on a free port."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if under_launcher():  # one srun task per GPU
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    return DistEnv(0, 1, 0, "127.0.0.1", free_port())


def under_launcher() -> bool:
    """True when torchrun or an ``srun`` step already started this process as one rank.

    A plain sbatch batch script also sets ``SLURM_PROCID``; without ``MASTER_ADDR`` exported it
    is not a launch, so ``megatron-vwn train --nproc N`` there still starts its own ranks.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return True
    return "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env
