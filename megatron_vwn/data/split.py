"""How ``data.split`` divides a dataset's documents, computed without importing Megatron-Core.

:func:`prepare_data` uses this to reject a split that leaves a dataset with no training
documents before any process is launched (importing Megatron-Core costs seconds, and an empty
split would otherwise only surface inside every rank). The arithmetic follows Megatron-Core's
``parse_and_normalize_split`` / ``convert_split_vector_to_split_matrix`` and the builder's
``round(bound * num_documents)``; :func:`build_datasets` still takes the bounds from Megatron
itself, so this is only an early check.
"""

from __future__ import annotations

import re
import struct

_IDX_MAGIC = b"MMIDIDX\x00\x00"

Bounds = tuple[float, float] | None


def split_bounds(split: str) -> list[Bounds]:
    """``"98,2,0"`` -> ``[(0.0, 0.98), (0.98, 1.0), None]`` (None: the split is empty)."""
    shares = [float(x) for x in re.findall(r"[.0-9]+", split)]
    shares += [0.0] * (3 - len(shares))
    total = sum(shares)
    shares = [s / total for s in shares]
    edges = [0.0]
    for share in shares:
        edges.append(edges[-1] + share)
    return [(a, b) if b > a else None for a, b in zip(edges[:-1], edges[1:], strict=True)]


def documents_in_split(num_documents: int, bounds: Bounds) -> int:
    """Documents a split gets, rounded the way Megatron's dataset builder rounds."""
    if bounds is None:
        return 0
    begin = int(round(bounds[0] * float(num_documents)))
    end = int(round(bounds[1] * float(num_documents)))
    return end - begin


def read_sequence_count(prefix: str) -> int:
    """Number of sequences (= documents, as we preprocess) in ``PREFIX.idx``, from its header.

    Header layout (Megatron's ``_IndexWriter``): 9-byte magic, uint64 version (1), uint8 dtype
    code, uint64 sequence count, uint64 document count, little-endian.
    """
    path = f"{prefix}.idx"
    with open(path, "rb") as stream:
        header = stream.read(34)
    if len(header) < 34 or header[:9] != _IDX_MAGIC:
        raise ValueError(f"{path} is not a Megatron indexed-dataset index")
    (version,) = struct.unpack("<Q", header[9:17])
    if version != 1:
        raise ValueError(f"{path}: unsupported index version {version}")
    (count,) = struct.unpack("<Q", header[18:26])
    return int(count)
