"""Hugging Face weight files: sharded safetensors with an index (never pickles)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """``"2GB"``, ``"500MiB"``, ``"1048576"`` -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 2GB, 500MB, 512MiB)")
    value, unit = match.groups()
    return int(float(value) * _UNITS[(unit or "").upper()])


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def save_sharded(tensors: dict[str, torch.Tensor], out_dir: Path,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 prefix: str = "model") -> list[str]:
    """Write ``prefix-0000i-of-0000N.safetensors`` shards of at most ``max_shard_bytes`` (a
    tensor larger than that gets a shard of its own) and ``prefix.safetensors.index.json``.
    Returns the shard file names."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors, key=_natural_key):
        tensor = tensors[name].detach().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    total = len(shards)
    names = [f"{prefix}-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    weight_map = {}
    for file_name, shard in zip(names, shards, strict=True):
        save_file(shard, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items(), key=lambda kv: _natural_key(kv[0]))),
    }
    (out_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def load_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF model directory (``model.safetensors`` or an indexed set)."""
    from safetensors.torch import load_file

    index = directory / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        pickles = sorted(p.name for p in directory.glob("*.bin")) + \
            sorted(p.name for p in directory.glob("*.pt"))
        hint = f" (found {pickles}: convert them to safetensors first)" if pickles else ""
        raise FileNotFoundError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(directory / name)))
    return tensors
