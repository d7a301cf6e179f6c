"""``metrics.jsonl``, the progress line, wandb and TensorBoard: all a run reports, from one rank.

``metrics.jsonl`` is a contract: one JSON object per logged iteration with at least
``iteration``, ``split`` ("train" or "valid"), ``consumed_tokens``, ``lm_loss``, and for training
rows ``lr``, ``grad_norm``, ``iter_time_s`` and ``tokens_per_s``. With multi-token prediction
both kinds of row add ``mtp_loss_1`` ... ``mtp_loss_K``. With ``analysis.interaction_interval``
there are also ``split: "analysis"`` rows (see :mod:`megatron_vwn.training.interaction_hook`).
Mixture-of-experts runs add ``moe_*`` keys to training rows
(:mod:`megatron_vwn.training.moe_metrics`).
Keys are added, never renamed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from megatron_vwn.training.tensorboard import scalars

logger = logging.getLogger(__name__)


def _mtp_text(row: dict[str, Any]) -> str:
    """`` | mtp1 5.123 | mtp2 5.456`` for the multi-token-prediction depths in a row."""
    depths = sorted(int(k.rsplit("_", 1)[1]) for k in row if k.startswith("mtp_loss_"))
    return "".join(f" | mtp{k} {row[f'mtp_loss_{k}']:.4f}" for k in depths)


def _moe_text(row: dict[str, Any]) -> str:
    """`` | moe aux 1.012 imb 1.31`` (plus ``drop``, ``bias``) for a mixture-of-experts row."""
    if "moe_aux_loss" not in row:
        return ""
    text = f" | moe aux {row['moe_aux_loss']:.3f} imb {row['moe_load_imbalance']:.2f}"
    if "moe_dropped_fraction" in row:
        text += f" drop {row['moe_dropped_fraction']:.3f}"
    if "moe_expert_bias_abs" in row:
        text += f" bias {row['moe_expert_bias_abs']:.2e}"
    return text


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsWriter:
    """Appends rows to ``run_dir/metrics.jsonl`` and mirrors them to wandb and TensorBoard (when
    enabled).

    Only the reporting rank constructs one with ``enabled=True``; other ranks get a no-op writer.
    """

    def __init__(
        self,
        run_dir: Path,
        total_iters: int,
        enabled: bool,
        wandb_mode: str = "off",
        wandb_project: str = "megatron-vwn",
        run_name: str | None = None,
        config: dict | None = None,
        tensorboard: bool = False,
    ):
        self.enabled = enabled
        self.total_iters = total_iters
        self.start_time = time.monotonic()
        self.path = run_dir / "metrics.jsonl"
        self._wandb = None
        self._tensorboard = None
        if not enabled:
            return
        self._file = open(self.path, "a", buffering=1)
        if wandb_mode != "off":
            self._wandb = _init_wandb(run_dir, wandb_mode, wandb_project, run_name, config)
        if tensorboard:
            from megatron_vwn.training.tensorboard import TensorBoardWriter

            self._tensorboard = TensorBoardWriter(run_dir)

    def log_train(self, row: dict[str, Any], start_iteration: int) -> None:
        """Write a training row and print the progress line."""
        if not self.enabled:
            return
        row = {"split": "train", **row}
        self._write(row)
        elapsed = time.monotonic() - self.start_time
        done = row["iteration"] - start_iteration
        remaining = self.total_iters - row["iteration"]
        eta = elapsed / done * remaining if done > 0 else math.nan
        logger.info(
            "iter %d/%d | loss %.4f%s%s | lr %.3e | grad %.3f | %.0f tok/s | %.3f s/it | "
            "elapsed %s | eta %s",
            row["iteration"], self.total_iters, row["lm_loss"], _mtp_text(row), _moe_text(row),
            row["lr"],
            row["grad_norm"] if row["grad_norm"] is not None else math.nan,
            row["tokens_per_s"], row["iter_time_s"], _clock(elapsed),
            _clock(eta) if eta == eta else "?",
        )

    def log_valid(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"split": "valid", **row}
        self._write(row)
        logger.info("validation at iter %d | loss %.4f%s | ppl %.2f", row["iteration"],
                    row["lm_loss"], _mtp_text(row), math.exp(min(row["lm_loss"], 50.0)))

    def log_analysis(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"split": "analysis", **row}
        self._write(row)
        logger.info("analysis at iter %d | AOFE ratio agop %.4f | wtw %.4f", row["iteration"],
                    row["aofe_ratio_agop"], row["aofe_ratio_wtw"])

    def _write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(scalars(row), step=row["iteration"])
        if self._tensorboard is not None:
            self._tensorboard.write(row)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _init_wandb(run_dir: Path, mode: str, project: str, name: str | None, config: dict):
    """wandb offline by default (no network, files under run_dir/wandb); online when asked."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=project,
        name=name or run_dir.name,
        dir=str(run_dir),
        mode=mode,
        config=config,
        reinit="finish_previous",
    )
