"""Read a checkpoint without training: iteration, layout it was written at, config, tensors.

    megatron-vwn checkpoint inspect PATH [--json]
    python tools/inspect_checkpoint.py PATH [--json]

``PATH`` is an ``iter_*`` directory, a ``checkpoints`` directory (its tracker's checkpoint) or a
run directory. Needs no process group: it reads the manifest, ``common.pt`` and the torch_dist
metadata (global shapes and dtypes), never the tensors themselves.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

from megatron_vwn.checkpoint.errors import CheckpointError
from megatron_vwn.checkpoint.files import (
    TRACKER,
    is_complete,
    iter_dir_name,
    list_complete,
    read_manifest,
    read_tracker,
)


def resolve_checkpoint_dir(path: Path) -> Path:
    """The checkpoint directory ``path`` means (see the module docstring)."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / "metadata.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    latest = read_tracker(path)
    if latest is not None:
        return path / iter_dir_name(latest)
    complete = list_complete(path)
    if complete:
        return complete[-1][1]
    raise CheckpointError(
        f"{path} holds no checkpoint (no {TRACKER}, no complete iter_* directory)"
    )


def inspect_checkpoint(path: str | Path) -> dict:
    """Everything the inspector reports, as plain data."""
    from megatron.core import dist_checkpointing

    from megatron_vwn.checkpoint.state import load_common_state_dict

    directory = resolve_checkpoint_dir(Path(path))
    report: dict = {"path": str(directory), "complete": is_complete(directory)}
    if report["complete"]:
        manifest = read_manifest(directory)
        report["files"] = len(manifest["files"])
        report["bytes_on_disk"] = sum(f["bytes"] for f in manifest["files"].values())
    common = load_common_state_dict(directory)
    run = common.get("run", {})
    report.update({
        "iteration": run.get("state", {}).get("iteration"),
        "run_state": run.get("state"),
        "layout": run.get("layout"),
        "padded_vocab_size": run.get("padded_vocab_size"),
        "version": run.get("version"),
        "optimizer_format": run.get("sharding"),
        "config": run.get("config"),
    })
    tensors = dist_checkpointing.load_tensors_metadata(str(directory))
    params, optim = [], []
    for key, meta in sorted(tensors.items()):
        shape = tuple(meta.global_shape)
        dtype = str(meta.dtype).replace("torch.", "")
        entry = {"name": key, "shape": list(shape), "dtype": dtype,
                 "bytes": math.prod(shape) * meta.dtype.itemsize}
        (optim if key.startswith("optimizer.") else params).append(entry)
    report["parameters"] = params
    report["parameter_count"] = sum(math.prod(p["shape"]) for p in params)
    report["parameter_bytes"] = sum(p["bytes"] for p in params)
    report["optimizer_tensors"] = len(optim)
    report["optimizer_bytes"] = sum(p["bytes"] for p in optim)
    return report


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _optimizer_text(fmt: dict | None) -> str:
    if not fmt:
        return "unknown"
    kind = "distributed (fully reshardable)" if fmt.get("distributed_optimizer") else "plain"
    return f"{kind}, {fmt.get('params_dtype')} parameters"


def format_report(report: dict) -> str:
    layout = report.get("layout") or {}
    lines = [
        f"checkpoint   {report['path']}"
        + ("" if report["complete"] else "   (INCOMPLETE: no manifest)"),
        f"iteration    {report['iteration']}   run state {report['run_state']}",
        f"written at   TP{layout.get('tensor')} x PP{layout.get('pipeline')}"
        f" (virtual {layout.get('virtual_pipeline')}) x DP{layout.get('data')}"
        f", world {layout.get('world_size')}; megatron-vwn {report['version']}",
        f"optimizer    {_optimizer_text(report['optimizer_format'])}: "
        f"{report['optimizer_tensors']} state tensors, {_mb(report['optimizer_bytes'])}",
    ]
    if "files" in report:
        lines.append(f"on disk      {report['files']} files, {_mb(report['bytes_on_disk'])}")
    lines.append(f"parameters   {report['parameter_count']:,} "
                 f"({_mb(report['parameter_bytes'])}, padded vocabulary "
                 f"{report['padded_vocab_size']})")
    width = max((len(p["name"]) for p in report["parameters"]), default=10)
    for p in report["parameters"]:
        shape = "x".join(str(s) for s in p["shape"])
        lines.append(f"  {p['name']:<{width}}  {shape:>16}  {p['dtype']:>8}  {_mb(p['bytes']):>10}")
    lines.append("config:")
    dumped = yaml.safe_dump(report["config"], sort_keys=False).rstrip()
    lines.extend("  " + line for line in dumped.splitlines())
    return "\n".join(lines)


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="an iter_* directory, a checkpoints directory or a run dir")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_inspect(ns: argparse.Namespace) -> int:
    report = inspect_checkpoint(ns.path)
    print(json.dumps(report, indent=1) if ns.json else format_report(report))
    return 0
