"""Which checkpoints to keep: ``checkpoint.keep_last`` and ``checkpoint.keep_every``.

Kept: the one the tracker names (always), the ``keep_last`` newest complete checkpoints, and every
complete checkpoint whose iteration is a multiple of ``keep_every``. With neither set, all are
kept. Incomplete directories (a save that was killed) are removed too. A directory is renamed to
``*.deleting`` before it is removed, so a crash while deleting never leaves a half-deleted
checkpoint that still looks complete.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from megatron_vwn.checkpoint.files import is_complete, list_iter_dirs

logger = logging.getLogger(__name__)

DELETING_SUFFIX = ".deleting"


def select_to_delete(
    iterations_complete: list[int],
    iterations_incomplete: list[int],
    latest: int | None,
    keep_last: int | None,
    keep_every: int | None,
) -> list[int]:
    """Iterations to delete, given the complete and incomplete ones on disk (pure function)."""
    delete = [it for it in iterations_incomplete if it != latest]
    if keep_last is None and keep_every is None:
        return sorted(delete)
    keep = {latest} if latest is not None else set()
    if keep_last:
        keep.update(sorted(iterations_complete)[-keep_last:])
    if keep_every:
        keep.update(it for it in iterations_complete if it % keep_every == 0)
    delete += [it for it in iterations_complete if it not in keep]
    return sorted(delete)


def remove_dir(path: Path) -> None:
    """Rename, then delete: a partly deleted directory never keeps its ``iter_*`` name."""
    doomed = path.with_name(path.name + DELETING_SUFFIX)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def apply_retention(
    checkpoints_dir: Path, latest: int, keep_last: int | None, keep_every: int | None
) -> list[int]:
    """Delete what the rules do not keep (call on one rank, with no save in flight)."""
    for leftover in checkpoints_dir.glob(f"*{DELETING_SUFFIX}"):
        shutil.rmtree(leftover, ignore_errors=True)
    dirs = dict(list_iter_dirs(checkpoints_dir))
    complete = [it for it, path in dirs.items() if is_complete(path)]
    incomplete = [it for it in dirs if it not in complete]
    doomed = select_to_delete(complete, incomplete, latest, keep_last, keep_every)
    for iteration in doomed:
        remove_dir(dirs[iteration])
    if doomed:
        logger.info("checkpoint retention removed iterations %s", doomed)
    return doomed
