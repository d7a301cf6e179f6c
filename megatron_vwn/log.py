"""Rank-aware logging: the library never prints; rank 0 (or the reporting rank) talks."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Import-time notices from Megatron-Core on machines without TE/apex: expected, not actionable.
_EXPECTED_WARNINGS = (
    r"Transformer Engine and Apex are not installed.*",
    r"Apex is not installed.*",
    r"full scope is deprecated.*",
)


# On CPU (gloo) these are about CUDA settings and a torch deprecation inside Megatron-Core.
_EXPECTED_ON_CPU = (
    r"When using async grad allreduce it is recommended.*",
    r".*all_gather_into_tensor. is deprecated.*",
    r".*reduce_scatter_tensor. is deprecated.*",
)


def silence_expected_warnings() -> None:
    import torch

    patterns = _EXPECTED_WARNINGS + (() if torch.cuda.is_available() else _EXPECTED_ON_CPU)
    for pattern in patterns:
        warnings.filterwarnings("ignore", message=pattern)


def setup_logging(rank: int, log_file: Path | None = None, level: int = logging.INFO) -> None:
    """INFO on the console for rank 0 only, WARNING elsewhere; rank 0 also writes ``log_file``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter(_FORMAT if rank == 0 else f"[rank {rank}] {_FORMAT}"))
    console.setLevel(level if rank == 0 else logging.WARNING)
    root.addHandler(console)
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(file_handler)
    root.setLevel(level)
    # Megatron-Core logs dataset-building details at INFO on every rank.
    logging.getLogger("megatron").setLevel(logging.WARNING)
