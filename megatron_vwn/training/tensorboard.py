"""TensorBoard events beside wandb (``logging.tensorboard=on``; docs/scale.md).

The rows of ``metrics.jsonl`` become scalars tagged ``SPLIT/KEY`` (``train/lm_loss``,
``train/lr``, ``valid/mtp_loss_1``, ``analysis/aofe_ratio_agop``, ...) at step ``iteration``:
the tags wandb gets (:func:`scalars` serves both), so the two loggers show the same
curves. Events go to ``RUN_DIR/tensorboard/`` through ``torch.utils.tensorboard`` (which needs
the ``tensorboard`` package); a resumed run appends a new event file there and TensorBoard
merges them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SUBDIR = "tensorboard"
SKIPPED = ("split", "iteration")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics row, tagged ``SPLIT/KEY`` (booleans as 0/1); a list of
    per-layer values (MoE routing) becomes one tag per layer, ``SPLIT/KEY/LAYER``. wandb gets
    the same tags (``training/metrics.py``)."""
    prefix = row["split"]
    tagged = {}
    for key, value in row.items():
        if key in SKIPPED:
            continue
        if isinstance(value, list):
            tagged.update({f"{prefix}/{key}/{i}": float(v) for i, v in enumerate(value)
                           if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)):
            tagged[f"{prefix}/{key}"] = float(value)
    return tagged


class TensorBoardWriter:
    """Mirrors metrics rows to a ``SummaryWriter`` under ``run_dir/tensorboard``."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(run_dir / SUBDIR))

    def write(self, row: dict[str, Any]) -> None:
        for tag, value in scalars(row).items():
            self._writer.add_scalar(tag, value, global_step=row["iteration"])

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
