"""Layout-independent parameter naming and initialisation.

A parameter's *global name* is its name in the single-process model: on a later pipeline stage
``decoder.layers.0`` is really layer ``layer_number - 1``, and under expert parallelism local
expert ``i`` is global expert ``ep_rank x local experts + i``. Global names let us

* initialise every tensor-parallel weight from a generator seeded by ``(seed, global name)`` over
  the full (unsharded) tensor, then keep this rank's shard: the same model at every TP/PP/VPP
  layout, which is what makes parity tests meaningful (renamed width slots seed with their old
  names, so the model drawn does not change with a rename); and
* compare gradients across layouts in tests.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vwn.model.moe import global_expert_name, tensor_shard
from megatron_vwn.model.width.registry import legacy_slot_names


def global_named_parameters(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``named_parameters`` of one (unwrapped) model chunk, with layer indices made global."""
    layers = getattr(getattr(chunk, "decoder", None), "layers", [])
    renames = {
        f"decoder.layers.{local}.": f"decoder.layers.{layer.layer_number - 1}."
        for local, layer in enumerate(layers)
    }
    for name, param in chunk.named_parameters():
        prefix = ".".join(name.split(".")[:3]) + "."
        if prefix in renames:
            name = renames[prefix] + name[len(prefix):]
        yield global_expert_name(name, param), param


def _init_method_for(name: str, config: TransformerConfig) -> Callable:
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return config.output_layer_init_method
    if "word_embeddings" in name:
        return config.embedding_init_method
    return config.init_method


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(_seed_name(name).encode())) % (2**63)


def _seed_name(name: str) -> str:
    """The name a parameter's initial values are drawn for: a renamed width slot keeps its old
    name (``WidthMember.legacy_slots``), so a run draws the same model as before the rename."""
    old = {slot: names[0] for slot, names in legacy_slot_names().items()}
    return ".".join(old.get(part, part) for part in name.split("."))


@torch.no_grad()
def initialize_layout_invariant(chunks: list[torch.nn.Module], seed: int) -> None:
    """Re-draw every tensor-parallel weight from its global name (CPU initialisation path).

    Megatron's CPU initialisation already makes the full weight and scatters it with the right
    stride (SwiGLU's ``[gate_r; up_r]``), so TP layouts agree; what differs across pipeline
    layouts is the RNG position when each layer is built. Seeding per global name removes that.
    """
    for chunk in chunks:
        config = chunk.config
        tied = getattr(chunk, "share_embeddings_and_output_weights", False)
        for name, param in global_named_parameters(chunk):
            custom = getattr(param, "layout_init", None)
            if custom is not None:  # replicated weights with their own init (e.g. W_expand)
                generator_state = torch.get_rng_state()
                torch.manual_seed(_seed_for(seed, name))
                custom(param)
                torch.set_rng_state(generator_state)
                continue
            if not getattr(param, "tensor_model_parallel", False) or param.dim() != 2:
                continue  # norms and GHC coefficients start from constants
            if tied and name == "output_layer.weight":
                # The last stage's copy of a tied embedding (pipeline > 1) draws the same values.
                name = "embedding.word_embeddings.weight"
            tp_rank, tp_size, _ = tensor_shard(param)  # expert-TP for routed experts
            dim = param.partition_dim
            stride = getattr(param, "partition_stride", 1)
            full_shape = list(param.shape)
            full_shape[dim] *= tp_size
            generator_state = torch.get_rng_state()
            torch.manual_seed(_seed_for(seed, name))
            master = torch.empty(full_shape, dtype=torch.float32)
            _init_method_for(name, config)(master)
            torch.set_rng_state(generator_state)
            pieces = torch.split(master, param.shape[dim] // stride, dim=dim)
            param.copy_(torch.cat(pieces[tp_rank::tp_size], dim=dim).to(param.dtype))
