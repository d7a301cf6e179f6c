"""Distributed checkpoints: save/resume through Megatron-Core ``dist_checkpointing`` (torch_dist),
exact run state, resharding across TP/PP/DP, fault-safe completion, retention.

See docs/checkpoints.md. The trainer uses :class:`CheckpointManager`; the inspector is
:func:`megatron_vwn.checkpoint.inspect.inspect_checkpoint`. Names are imported lazily so the
file-level modules (``files``, ``retention``, ``inspect``'s argument parser) load without
Megatron-Core.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointError": "megatron_vwn.checkpoint.errors",
    "CorruptCheckpointError": "megatron_vwn.checkpoint.errors",
    "CheckpointManager": "megatron_vwn.checkpoint.manager",
    "RunState": "megatron_vwn.checkpoint.state",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
