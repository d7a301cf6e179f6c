"""The on-disk layout of checkpoints: names, the tracker file, completeness manifests.

::

    run.dir/checkpoints/
        latest_checkpointed_iteration.txt   tracker: the iteration of the latest complete one
        iter_0000006/                        one checkpoint (Megatron-Core torch_dist format)
            .metadata  __0_0.distcp ...      sharded tensors and objects (every rank writes)
            common.pt  metadata.json         non-sharded state, format marker (rank 0)
            config.yaml                      the resolved config (for people and the inspector)
            checkpoint.json                  manifest: written last, after every rank finished

A checkpoint is *complete* when its ``checkpoint.json`` exists: rank 0 writes it (atomically)
only after all ranks have finished writing, and it lists every file with its size and CRC-32 so
a truncated or corrupted file is found before loading. The tracker is rewritten (atomic rename)
after the manifest, so at every moment it names a complete checkpoint. Everything here is plain
file handling: no process groups.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from megatron_vwn.checkpoint.errors import CorruptCheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "checkpoint.json"
CONFIG_FILE = "config.yaml"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_CHUNK = 1 << 24


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_of(path: Path) -> int | None:
    """The iteration of an ``iter_NNNNNNN`` directory, None for any other name."""
    match = _ITER_RE.match(path.name)
    return int(match.group(1)) if match else None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a part."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_tracker(checkpoints_dir: Path) -> int | None:
    """The iteration the tracker names; None when there is no tracker. A tracker that is not a
    number is reported like a missing one would be, with its content."""
    path = checkpoints_dir / TRACKER
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        return int(text)
    except ValueError:
        raise CorruptCheckpointError(
            f"tracker file {path} holds {text[:40]!r}, not an iteration number"
        ) from None


def write_tracker(checkpoints_dir: Path, iteration: int) -> None:
    atomic_write_text(checkpoints_dir / TRACKER, f"{iteration}\n")


def list_iter_dirs(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """All ``iter_*`` directories, complete or not, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for child in checkpoints_dir.iterdir():
        iteration = iteration_of(child)
        if iteration is not None and child.is_dir():
            found.append((iteration, child))
    return sorted(found)


def is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def list_complete(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (manifest present), oldest first."""
    return [(it, p) for it, p in list_iter_dirs(checkpoints_dir) if is_complete(p)]


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            crc = zlib.crc32(block, crc)
    return crc


def data_files(path: Path) -> list[str]:
    """The files of a checkpoint directory that its manifest covers (all but the manifest and
    temporary files), sorted."""
    return sorted(
        p.name for p in path.iterdir()
        if p.is_file() and p.name != MANIFEST and ".tmp." not in p.name
    )


def describe_files(path: Path, names: list[str]) -> dict[str, dict]:
    """``{name: {"bytes": size, "crc32": crc}}`` for the given files of ``path``."""
    return {
        name: {"bytes": (path / name).stat().st_size, "crc32": file_crc32(path / name)}
        for name in names
    }


def write_manifest(path: Path, manifest: dict) -> None:
    """Mark ``path`` complete: the manifest is the last file written."""
    atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(path: Path) -> dict:
    """The manifest of a complete checkpoint; raises if the checkpoint is incomplete."""
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"checkpoint {path} is incomplete: {MANIFEST} is missing (its save did not finish)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"checkpoint {path}: {file} is corrupted ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CorruptCheckpointError(f"checkpoint {path}: {file} has no file list")
    return manifest


def check_files(path: Path, manifest: dict, names: list[str] | None = None) -> list[str]:
    """Problems with the listed files (all by default): missing, wrong size, wrong CRC-32.

    Returns one message per bad file, naming it; empty when all are intact.
    """
    files = manifest["files"]
    problems = []
    for name in names if names is not None else sorted(files):
        expected = files[name]
        file = path / name
        if not file.is_file():
            problems.append(f"{file} is missing")
            continue
        size = file.stat().st_size
        if size != expected["bytes"]:
            problems.append(f"{file} is truncated or altered ({size} bytes, expected "
                            f"{expected['bytes']})")
        elif file_crc32(file) != expected["crc32"]:
            problems.append(f"{file} is corrupted (CRC-32 mismatch)")
    return problems


@dataclass(frozen=True)
class Candidate:
    """A checkpoint a run may start from, and why it was chosen."""

    iteration: int
    path: Path
    reason: str
