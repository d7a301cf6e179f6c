"""Model weights from a checkpoint into bare model chunks (docs/training_loop.md).

The weights half of loading, for every command that runs a model without training it (``eval``,
``convert``): the chunks come from :func:`megatron_vwn.training.build.build_model_parts` at any
layout, and Megatron-Core ``dist_checkpointing`` reshards whatever TP/PP/VPP layout the
checkpoint was written at (docs/checkpoints.md). A training run loads all its state through
:class:`~megatron_vwn.checkpoint.manager.CheckpointManager`, which verifies with the same
:func:`verify_checkpoint`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from megatron_vwn.checkpoint.compat import check_model_fits
from megatron_vwn.checkpoint.errors import (
    LOAD_ERRORS,
    CheckpointError,
    CorruptCheckpointError,
    describe_load_error,
)
from megatron_vwn.checkpoint.files import check_files, read_manifest
from megatron_vwn.checkpoint.legacy_keys import load_legacy_keys
from megatron_vwn.checkpoint.state import (
    SavedRun,
    load_common_state_dict,
    model_keys,
    model_sharded_state_dict,
    sharding_metadata,
)
from megatron_vwn.config.schema import ModelConfig

logger = logging.getLogger(__name__)


def verify_checkpoint(path: Path) -> None:
    """Manifest present and every file intact; each rank checks its share (collective)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        manifest = read_manifest(path)
        problems = check_files(path, manifest, sorted(manifest["files"])[rank::world])
    except CorruptCheckpointError as exc:
        problems = [str(exc)]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, problems)
    problems = sorted({p for rank_problems in gathered for p in rank_problems})
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        message = problems[0] if problems[0].startswith("checkpoint ") else (
            f"checkpoint {path} is corrupted: {problems[0]}")
        raise CorruptCheckpointError(message + more)


def saved_run(path: Path) -> SavedRun:
    """The run state a megatron-vwn checkpoint stores beside its tensors."""
    common = load_common_state_dict(path)
    if "run" not in common:
        raise CheckpointError(f"checkpoint {path} holds no megatron-vwn run state (written by "
                              f"another program?); it cannot be resumed")
    return SavedRun.from_dict(common["run"])


def load_weights(modules: list, path: Path, model: ModelConfig, padded_vocab_size: int,
                 verify: bool = True) -> SavedRun:
    """Load the model weights of checkpoint ``path`` into this rank's bare chunks ``modules``
    (every rank calls it); returns the checkpoint's run state.

    ``verify``: check the manifest's sizes and CRC-32s first (a caller that already did passes
    False). The checkpoint's model must fit ``model`` at ``padded_vocab_size`` rows.
    """
    if verify:
        verify_checkpoint(path)
    tick = time.perf_counter()
    saved = saved_run(path)
    check_model_fits(str(path), saved.config.get("model", {}), saved.padded_vocab_size, model,
                     padded_vocab_size)
    state_dict = model_sharded_state_dict(modules, sharding_metadata(False))
    loaded = load_sharded(state_dict, path)
    for key, module in zip(model_keys(len(modules)), modules, strict=True):
        module.load_state_dict(loaded[key], strict=True)
    logger.info("loaded model weights from %s (iteration %d, saved at %s) in %.1f s", path,
                saved.state.iteration, saved.layout.describe(), time.perf_counter() - tick)
    return saved


def load_sharded(state_dict: dict, path) -> dict:
    """``dist_checkpointing.load`` with its failures (raised on every rank alike) reported as
    the user's error in one line. Keys of renamed width slots that the checkpoint holds only
    under their old names are read under those (``legacy_keys.py``; ``state_dict`` is changed in
    place, the result is keyed as it is)."""
    try:
        load_legacy_keys(state_dict, path)
        return dist_checkpointing.load(state_dict, str(path))
    except LOAD_ERRORS as exc:
        raise CheckpointError(f"checkpoint {path} could not be loaded: "
                              f"{describe_load_error(exc)}") from exc
