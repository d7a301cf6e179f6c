"""A save that fails loses nothing: agreement, clean-up and the testing aid that causes one.

Any rank may fail to write (disk full, permissions, an I/O error): the ranks agree on the
failure (one all-gather), rank 0 removes the partial ``iter_N`` directory, and the tracker, which
is only rewritten after a complete save, keeps naming the previous checkpoint.
``checkpoint.on_save_error`` then decides between stopping (exit status 5) and training on.

Megatron-Core's save runs collectives between its file writes, and a rank whose write fails
leaves them early, which would leave the others waiting. So before the save every rank reserves
the space it is about to write (:func:`reserve_space`: ``posix_fallocate`` of its expected share
in the new directory, then removed) and the ranks agree on the outcome: a full disk, a quota, a
read-only or failing file system shows up there, on the ranks it concerns, before any
collective of the save has started. A write that still fails later (the disk filled up during
the save) ends the job within ``parallel.timeout_s`` instead, with the previous checkpoint still
the latest.

``debug.save_error_at`` makes a save fail for real on the last rank: for the duration of the
save its file-size limit (``RLIMIT_FSIZE``) is 0, so every write of a non-empty file is refused
by the kernel with ``EFBIG`` (Python ignores the accompanying SIGXFSZ), deep inside
Megatron-Core's writer, as a full disk would.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_vwn.checkpoint.retention import remove_dir

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def injected_save_error(save_error_at: list[int], iteration: int) -> Iterator[None]:
    """Lower this rank's file-size limit to 0 while saving ``iteration`` if the testing aid
    ``debug.save_error_at`` names it and this is the last rank."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if iteration not in save_error_at or rank != world - 1:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def local_bytes(state_dict: dict) -> int:
    """Bytes of the tensors in a (sharded) state dict held by this rank."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    total = 0
    for value in nested_values(state_dict):
        data = getattr(value, "data", None)
        if isinstance(data, torch.Tensor):
            total += data.numel() * data.element_size()
    return total


def reserve_space(directory: Path, nbytes: int) -> None:
    """Reserve ``nbytes`` in ``directory`` and give them back: raises the ``OSError`` a write
    would meet (ENOSPC, EDQUOT, EROFS, EACCES, EIO, EFBIG). File systems without
    ``fallocate`` get a one-block write instead."""
    probe = directory / f".space-check.tmp.{os.getpid()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, max(nbytes, 1))
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.write(fd, b"\0" * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def gather_errors(error: BaseException | None) -> list[tuple[int, str]]:
    """``(rank, message)`` of every rank whose ``error`` is set, the same list on every rank
    (a collective: every rank calls it, failed or not)."""
    world = torch.distributed.get_world_size()
    gathered: list = [None] * world
    text = None if error is None else f"{type(error).__name__}: {error}"
    torch.distributed.all_gather_object(gathered, text)
    return [(rank, message) for rank, message in enumerate(gathered) if message is not None]


def describe_errors(errors: list[tuple[int, str]]) -> str:
    first_rank, first = errors[0]
    others = f" (and on {len(errors) - 1} more rank(s))" if len(errors) > 1 else ""
    return f"on rank {first_rank}: {first[:300]}{others}"


def remove_partial(path: Path) -> None:
    """Rank 0: delete what a failed save left in ``path`` (if anything)."""
    if path.exists():
        try:
            remove_dir(path)
        except OSError as exc:  # the next save of this iteration, or retention, retries
            logger.warning("could not remove the partial checkpoint %s: %s", path, exc)
