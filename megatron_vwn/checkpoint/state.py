"""What a checkpoint holds, as Megatron-Core sharded state dicts.

::

    {
      "model" | "model0", "model1", ...   module.sharded_state_dict() per (virtual) stage
      "optimizer":  optimizer.sharded_state_dict(model part)      (not with weights_only)
      "rng_state":  ShardedObject over (pp, tp, dp): python, numpy, torch, CUDA, Megatron tracker
      "opt_param_scheduler": scheduler.state_dict()                (common)
      "run": {iteration, consumed samples, layout, padded vocab, config, version}  (common)
    }

Model tensors are keyed by global parameter names with global layer offsets, so they reshard
across TP/PP/VPP/DP on load. The plain (fp32) Megatron optimizer stores its state as tensors
sharded like their parameters: reshardable the same way. The distributed optimizer is saved in
Megatron-Core's ``fully_reshardable`` format (TP/PP/DP). RNG states are per rank: they are
restored only at the layout they were saved at (elsewhere the run keeps its fresh seeds).
"""

from __future__ import annotations

import importlib.metadata
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_vwn.checkpoint.errors import CheckpointError
from megatron_vwn.compat.mcore import READS_EMBEDDED_COMMON_STATE, canonical_checkpoint_keys
from megatron_vwn.compat.mcore_internals import loading_present_states_only

FORMAT_VERSION = 1
DISTOPT_SHARDING = "fully_reshardable"


@dataclass
class RunState:
    """Where a run stands; everything else about it follows from the config."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0


@dataclass
class Layout:
    """The parallel layout a checkpoint was written at."""

    tensor: int
    pipeline: int
    virtual_pipeline: int
    data: int
    world_size: int

    @classmethod
    def current(cls) -> Layout:
        return cls(
            tensor=parallel_state.get_tensor_model_parallel_world_size(),
            pipeline=parallel_state.get_pipeline_model_parallel_world_size(),
            virtual_pipeline=parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
            data=parallel_state.get_data_parallel_world_size(),
            world_size=torch.distributed.get_world_size(),
        )

    def describe(self) -> str:
        vpp = f" (x virtual {self.virtual_pipeline})" if self.virtual_pipeline > 1 else ""
        return f"TP{self.tensor} x PP{self.pipeline}{vpp} x DP{self.data}"


@dataclass
class SavedRun:
    """The ``run`` entry of a checkpoint's common state."""

    state: RunState
    layout: Layout
    padded_vocab_size: int
    config: dict
    version: str
    format_version: int = FORMAT_VERSION
    sharding: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> SavedRun:
        return cls(
            state=RunState(**raw["state"]),
            layout=Layout(**raw["layout"]),
            padded_vocab_size=raw["padded_vocab_size"],
            config=raw["config"],
            version=raw["version"],
            format_version=raw.get("format_version", FORMAT_VERSION),
            sharding=raw.get("sharding", {}),
        )


def sharding_metadata(distributed_optimizer: bool) -> dict:
    """The metadata Megatron-Core's ``sharded_state_dict`` methods read (as Megatron-LM builds
    it): fully reshardable distributed-optimizer format, no prefixes for chained optimizers."""
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = DISTOPT_SHARDING
    return metadata


def _with_groups(metadata: dict) -> dict:
    return {
        **metadata,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }


def model_keys(num_chunks: int) -> list[str]:
    """Megatron-LM's names: ``model`` for one chunk, ``model0``, ``model1``, ... with VPP."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_sharded_state_dict(modules: list, metadata: dict) -> dict:
    """The sharded state of every bare model chunk (its ``vp_stage`` gives the layer offsets),
    stored under the same keys whatever the Megatron-Core release (``compat/mcore.py``)."""
    meta = _with_groups(metadata)
    return {
        key: canonical_checkpoint_keys(module.sharded_state_dict(prefix="", metadata=meta))
        for key, module in zip(model_keys(len(modules)), modules, strict=True)
    }


def optimizer_sharded_state_dict(
    optimizer, model_state: dict, metadata: dict, is_loading: bool
) -> dict:
    if is_loading:
        _prime_empty_adam_state(optimizer)
    return optimizer.sharded_state_dict(model_state, is_loading, metadata=_with_groups(metadata))


def _torch_adam_distributed_optimizers(optimizer) -> list:
    """The distributed optimizers of ``optimizer`` that step with PyTorch's Adam (no Apex/TE)."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    return [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(opt, distrib_optimizer.DistributedOptimizer)]


def load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, working around Megatron-Core 0.16 with PyTorch's Adam.

    With the distributed optimizer and PyTorch's Adam (no Apex / TE: every CPU run), Megatron-Core
    copies each loaded parameter state into *every* key of the Adam state, which includes
    ``step``, absent from the loaded tensors (it is restored separately, from the param groups):
    a ``KeyError``. For the duration of the load, such copies skip keys the loaded state lacks.
    It also gives every parameter the *same* ``step`` tensor, which Adam then increments once
    per parameter and step; each parameter gets its own copy afterwards.
    """
    patched = _torch_adam_distributed_optimizers(optimizer)
    with loading_present_states_only(patched):
        optimizer.load_state_dict(state)
    for opt in patched:
        for param_state in opt.optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()


def _prime_empty_adam_state(optimizer) -> None:
    """Zero Adam state (with its ``step``) for parameters that have none yet.

    With PyTorch's Adam (no Apex / Transformer Engine, e.g. on CPU) Megatron-Core's
    ``DistributedOptimizer.state_dict()`` reads a ``step`` per parameter, which a fresh optimizer
    does not have; the checkpoint's values replace these zeros when it is loaded.
    """
    for opt in _torch_adam_distributed_optimizers(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(param.data),
                        "exp_avg_sq": torch.zeros_like(param.data),
                    }


def capture_rng() -> dict[str, Any]:
    """Every RNG state of this rank: python, numpy, torch (CPU and CUDA), Megatron's tracker."""
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def rng_sharded_object(state: dict[str, Any] | None) -> ShardedObject:
    """One RNG entry per rank, laid out over (pipeline, tensor, data) ranks."""
    return ShardedObject(
        "rng_state",
        state,
        (
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_data_parallel_world_size(),
        ),
        (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(),
        ),
        replica_id=0,
    )


def load_common_state_dict(path: str | Path) -> dict:
    """``dist_checkpointing.load_common_state_dict``, refusing with a clear line a checkpoint in a
    format this release cannot read (``compat/mcore.py``: 0.16 reads only ``common.pt``)."""
    path = Path(path)
    if not READS_EMBEDDED_COMMON_STATE and not (path / "common.pt").exists():
        raise CheckpointError(
            f"checkpoint {path} was written by a newer Megatron-Core (its common state is inside "
            f"the torch_dist files, as 0.19 writes it); megatron-core "
            f"{importlib.metadata.version('megatron-core')} here reads only common.pt: load it "
            f"with the release that wrote it (0.19.2 is tested)")
    return dist_checkpointing.load_common_state_dict(str(path))
