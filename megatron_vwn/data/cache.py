"""The data cache directory and a build-once primitive that is safe across processes.

Several processes may ask for the same cached artefact at once (the ranks of one ``torchrun``,
two jobs sharing a home directory, parallel tests). :func:`build_once` makes exactly one of them
build it, in a private temporary directory that is renamed into place when complete; the others
wait on an ``fcntl`` lock and then reuse the result. A reader therefore sees either nothing or
a complete directory, never a half-written one, and a crashed build leaves only a temporary
directory that the next build ignores. Once built, the check is a single ``stat`` (no lock).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

APP_NAME = "megatron_vwn"
COMPLETE_MARKER = ".complete"


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/megatron_vwn``, or ``~/.cache/megatron_vwn`` when that is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, APP_NAME)


def resolve_cache_dir(cache_dir: str | None) -> str:
    """The absolute cache directory for ``data.cache_dir`` (None means the default)."""
    path = cache_dir if cache_dir else default_cache_dir()
    return os.path.abspath(os.path.expanduser(path))


@contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if missing) for the block.

    The lock is released by the kernel if the process dies, so a crash cannot wedge others.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def is_complete(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, COMPLETE_MARKER))


def build_once(directory: str, build: Callable[[str], None]) -> str:
    """Return ``directory``, first calling ``build(tmp_dir)`` if it does not exist yet.

    ``build`` fills ``tmp_dir`` (a fresh directory beside ``directory``, same file system),
    which is then renamed to ``directory`` atomically. Concurrent callers serialise on
    ``directory + '.lock'``; whoever comes second finds the finished directory.
    """
    directory = os.path.abspath(directory)
    if is_complete(directory):
        return directory
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    with file_lock(directory + ".lock"):
        if is_complete(directory):
            return directory
        if os.path.exists(directory):
            # Left by a build that was interrupted after the rename but before the marker
            # (cannot happen with this code, but do not trust the directory either way).
            shutil.rmtree(directory)
        tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
        try:
            build(tmp_dir)
            with open(os.path.join(tmp_dir, COMPLETE_MARKER), "w", encoding="utf-8") as marker:
                marker.write("ok\n")
            os.rename(tmp_dir, directory)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    logger.info("built %s", directory)
    return directory
