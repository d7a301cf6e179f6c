"""Checkpoints written before a width slot was renamed: their keys, asked for under the old name.

The width members' connection modules sit in layer attributes (``WidthMember.slots``) whose
names are part of every checkpoint key of their parameters, the model's
(``decoder.layers.attention_connection.proj``) and the optimizer's, which embed them
(``optimizer.state.exp_avg.decoder.layers.attention_connection.proj``). When a slot is renamed,
its member records the old name (``WidthMember.legacy_slots``, collected by
:func:`megatron_vwn.model.width.registry.legacy_slot_names`) and a load asks for the old key
wherever the checkpoint holds it but not the new one (:func:`map_legacy_keys`). Only the key a
``ShardedTensor`` / ``ShardedObject`` / factory is *read under* changes: the sharded state dict
keeps its structure, so the loaded state dict goes into ``load_state_dict`` as it is, and the
resharding (which matches global keys and offsets) works at any layout. A key that the checkpoint
holds under neither name is left alone, so the load fails as it always did (missing key).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from pathlib import Path

from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

from megatron_vwn.model.width.registry import legacy_slot_names

logger = logging.getLogger(__name__)


def _sharded_items(sharded_state_dict: dict) -> list:
    """Every ``ShardedTensor``, ``ShardedObject`` and factory of a (nested) sharded state dict."""
    return [item for item in nested_values(sharded_state_dict) if isinstance(item, ShardedBase)]


def legacy_candidates(key: str, renames: Mapping[str, Collection[str]]) -> list[str]:
    """The keys ``key`` had before its renamed slots (``renames``: slot -> old names); one
    dotted component is replaced at a time (a key holds one slot)."""
    parts = key.split(".")
    return [".".join([*parts[:i], old, *parts[i + 1:]])
            for i, part in enumerate(parts) for old in renames.get(part, ())]


def map_legacy_keys(sharded_state_dict: dict, stored: Collection[str],
                    renames: Mapping[str, Collection[str]] | None = None) -> dict[str, str]:
    """Rename, in place, each requested key that ``stored`` (the checkpoint's keys) lacks but
    holds in its pre-rename form (the first such form, if several): returns ``{new: old}``.

    ``renames`` defaults to every registered member's :func:`legacy_slot_names`. A key stored
    under neither name, or already stored under its own, is not touched.
    """
    renames = legacy_slot_names() if renames is None else renames
    stored = set(stored)
    mapped: dict[str, str] = {}
    for item in _sharded_items(sharded_state_dict):
        key = item.key
        if key in stored:
            continue
        old = next((c for c in legacy_candidates(key, renames) if c in stored), None)
        if old is not None:
            item.key = old
            mapped[key] = old
    return mapped


def stored_keys(path: str | Path) -> set[str]:
    """The keys of every sharded tensor and object in checkpoint ``path`` (its metadata file
    only, no tensor data and no process group)."""
    return {item.key for item in load_sharded_metadata(str(path)).values()}


def load_legacy_keys(sharded_state_dict: dict, path: str | Path) -> dict[str, str]:
    """:func:`map_legacy_keys` against checkpoint ``path``; reads its metadata only when a
    requested key names a renamed slot (so models without width connections never do)."""
    renames = legacy_slot_names()
    if not any(legacy_candidates(item.key, renames)
               for item in _sharded_items(sharded_state_dict)):
        return {}
    mapped = map_legacy_keys(sharded_state_dict, stored_keys(path), renames)
    if mapped:
        slots = sorted({f"{old_part} -> {new_part}" for new, old in mapped.items()
                        for new_part, old_part in zip(new.split("."), old.split("."),
                                                      strict=True) if new_part != old_part})
        logger.info("checkpoint %s was written with older width slot names (%s): %d keys read "
                    "under their old names", path, ", ".join(slots), len(mapped))
    return mapped
