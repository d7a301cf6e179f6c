"""``metrics.jsonl``: the rows a run logs, one JSON object per line (docs/runs.md).

Written by rank 0 through :class:`megatron_vwn.training.metrics.MetricsWriter`, appended to
across resumes; rows logged after the checkpoint a run resumes from are dropped by
:func:`trim_rows` (the checkpoint manager calls it), so every iteration appears once.

Every row has ``split``, ``iteration`` and ``consumed_tokens``; by split:

* ``"train"`` (every ``logging.interval`` iterations and the last): ``lm_loss`` (mean over the
  logging window), ``lr``, ``grad_norm`` (null when not computed), ``iter_time_s``,
  ``tokens_per_s``, ``tflops_per_s_per_rank``, ``skipped``; with multi-token prediction
  ``mtp_loss_1`` ... ``mtp_loss_K``; mixture-of-experts runs add ``moe_*`` keys
  (:mod:`megatron_vwn.training.moe_metrics`);
* ``"valid"`` (every ``train.eval_interval`` iterations and the last): ``lm_loss`` (and
  ``mtp_loss_k`` with MTP);
* ``"analysis"`` (with ``analysis.interaction_interval``): ``aofe_ratio_agop``, ``aofe_agop``,
  ``aofe_ratio_wtw``, ``aofe_wtw``, ``analysis_sequences``, ``analysis_probes``,
  ``analysis_time_s`` (:mod:`megatron_vwn.training.interaction_hook`).

Keys are added, never renamed. A reader skips a line that does not parse: the last line of a
run that is writing right now, or one cut off by a crash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def metrics_path(run_dir: str | Path) -> Path:
    """Where a run directory's rows are."""
    return Path(run_dir) / METRICS_FILE


def read_rows(run_dir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """A run's rows in the order they were logged (only ``split``'s when given); none when the
    run has not logged yet."""
    path = metrics_path(run_dir)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    if split is not None:
        rows = [row for row in rows if row.get("split") == split]
    return rows


def reached(run_dir: str | Path, iteration: int) -> bool:
    """Whether the run logged a training row at ``iteration`` (``train.iters``: it finished)."""
    return any(row.get("iteration") == iteration for row in read_rows(run_dir, "train"))


def trim_rows(run_dir: str | Path, iteration: int) -> int:
    """Drop the rows after ``iteration`` (logged after the checkpoint the run resumes from, so
    they are trained again) and any line cut off by a crash; returns how many were dropped."""
    path = metrics_path(run_dir)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # a row cut off by a crash
            continue
        if row.get("iteration", 0) > iteration:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped
