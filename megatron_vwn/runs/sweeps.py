"""Sweep directories: the manifest that names a sweep's runs, and where each run directory is
(docs/runs.md).

A sweep directory ``RUNS_DIR/NAME`` holds one manifest, written by the sweep runner
(:mod:`megatron_vwn.launch.runner`) when it starts or submits the runs: ``sweep.json`` for a
width sweep (:mod:`megatron_vwn.launch.sweep`), ``shape_sweep.json`` for a depth-width shape
sweep (:mod:`megatron_vwn.studies.shape_sweep`). Both are a JSON object with ``name``,
``config``, ``overrides``, ``token_budget``, ``submit_dir`` (the directory the runs were started
from: relative run directories start there) and ``runs``, a list with one object per run with at
least ``name``, ``run_dir`` and ``train_args``; the rest is the plan's own (width: ``width``,
``m``, ``n`` and ``submissions``, the job ids of each submission; shape: ``kind``, ``budgets``,
``depths``, ``seeds``, ``count``, ``mode``, ``written_at`` and per run ``budget``, ``seed``,
``shape``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_vwn.config.errors import ConfigError

WIDTH_MANIFEST = "sweep.json"
SHAPE_MANIFEST = "shape_sweep.json"
_NOT_A = {WIDTH_MANIFEST: "not a sweep directory",
          SHAPE_MANIFEST: "not a shape sweep directory (megatron-vwn shape sweep writes it)"}


def read_manifest(directory: str | Path, name: str) -> dict[str, Any]:
    """The manifest ``name`` (``WIDTH_MANIFEST`` or ``SHAPE_MANIFEST``) of a sweep directory;
    :class:`ConfigError` when the directory has none."""
    path = Path(directory) / name
    if not path.is_file():
        raise ConfigError(f"{path} not found: {_NOT_A[name]}")
    return json.loads(path.read_text())


def write_manifest(directory: str | Path, name: str, manifest: dict[str, Any]) -> Path:
    """Write (replace) the manifest ``name`` of a sweep directory, creating the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def run_directory(manifest: dict[str, Any], run: dict[str, Any], directory: Path) -> Path:
    """A run's directory: an absolute ``run_dir`` as it is; a relative one from the submission
    directory, else next to the manifest (a sweep directory that was copied or moved)."""
    path = Path(run["run_dir"])
    if path.is_absolute():
        return path
    submitted = Path(manifest.get("submit_dir", ".")) / path
    return submitted if submitted.is_dir() else Path(directory) / path.name
