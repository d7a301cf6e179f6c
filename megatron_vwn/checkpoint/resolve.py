"""Which checkpoint to start from, decided from the files alone. No process groups: the manager
runs this on rank 0 and broadcasts the result.
"""

from __future__ import annotations

import logging
from pathlib import Path

from megatron_vwn.checkpoint.errors import CheckpointError, CorruptCheckpointError
from megatron_vwn.checkpoint.files import (
    TRACKER,
    Candidate,
    iter_dir_name,
    iteration_of,
    list_complete,
    read_tracker,
)

logger = logging.getLogger(__name__)


def find_candidates(checkpoints_dir: Path) -> tuple[list[Candidate], list[str]]:
    """Checkpoints to try in order (tracker's first, then older complete ones) and warnings."""
    warnings = []
    try:
        latest = read_tracker(checkpoints_dir)
    except CorruptCheckpointError as exc:
        warnings.append(f"{exc}; using the newest complete checkpoint instead")
        latest = None
    complete = list_complete(checkpoints_dir)
    if latest is not None:
        first = Candidate(latest, checkpoints_dir / iter_dir_name(latest), "named by the tracker")
        older = [Candidate(it, p, "previous complete checkpoint")
                 for it, p in reversed(complete) if it < latest]
        return [first, *older], warnings
    if complete and not warnings:
        warnings.append(
            f"tracker file {checkpoints_dir / TRACKER} is missing; using the newest complete "
            f"checkpoint {complete[-1][1]}"
        )
    newest_first = [Candidate(it, p, "newest complete checkpoint") for it, p in reversed(complete)]
    return newest_first, warnings


def explicit_candidates(path: Path) -> list[Candidate]:
    """``checkpoint.load``: one checkpoint directory, or a checkpoints directory (its tracker)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint.load ({path}) does not exist")
    if (path / "metadata.json").is_file():
        iteration = iteration_of(path)
        return [Candidate(iteration if iteration is not None else -1, path, "checkpoint.load")]
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    candidates, warnings = find_candidates(path)
    for warning in warnings:
        logger.warning(warning)
    if not candidates:
        raise CheckpointError(
            f"checkpoint.load ({path}) holds no complete checkpoint (no {TRACKER} and no "
            f"iter_* directory with a manifest)"
        )
    return candidates[:1]
