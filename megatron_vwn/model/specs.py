"""Layer and block specs for the Llama-style backbone.

Two backends, chosen once per run:

* Transformer Engine (``transformer_engine``): Megatron-Core's TE spec unchanged (fused
  norm+linear, TE attention). Used on GPU when TE is installed.
* local: Megatron-Core's local spec with two substitutions: our sequence-parallel-aware
  :class:`RMSNorm` for the norms, and :class:`SDPAttention` instead of the unfused
  ``DotProductAttention``. Used on CPU and on GPUs without TE.

Later features (virtual width, MTP) patch these specs (the layer ``module``, extra submodules);
they never fork the model.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlockSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.model.attention import SDPAttention
from megatron_vwn.model.mtp import mtp_block_spec
from megatron_vwn.model.norm import RMSNorm
from megatron_vwn.model.width.vwn import VWNShape, vwn_layer_spec
from megatron_vwn.model.width.vwn_io import VWNFinalNorm


def transformer_engine_available() -> bool:
    """TE is usable only with CUDA; on CPU it must not even be imported (PLATFORM.md)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_transformer_impl(impl: str) -> str:
    """``auto`` -> ``transformer_engine`` when available, else ``local``; refuses the impossible."""
    if impl == "auto":
        return "transformer_engine" if transformer_engine_available() else "local"
    if impl == "transformer_engine" and not transformer_engine_available():
        raise ConfigError(
            "model.transformer_impl ('transformer_engine') needs CUDA and transformer-engine "
            "(pip install '.[gpu]'); allowed here: 'auto', 'local'"
        )
    return impl


def backbone_layer_spec(impl: str, num_experts: int | None = None,
                        grouped_gemm: bool = False) -> ModuleSpec:
    """The spec of one backbone ``TransformerLayer`` for a resolved backend; with
    ``num_experts`` its MLP is Megatron-Core's ``MoELayer`` (docs/moe.md)."""
    if impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts,
                                                          moe_grouped_gemm=grouped_gemm)
    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=grouped_gemm,
                                    normalization="RMSNorm")
    layer = spec.submodules
    if num_experts:
        # The local spec saves the pre-MLP norm as the dense fc1's fused norm; an MoE layer has
        # no such fc1, and Transformer Engine's MoE spec saves pre_mlp_layernorm.weight: so do we.
        keys = {key: value for key, value in layer.sharded_state_dict_keys_map.items()
                if not key.startswith("pre_mlp_layernorm")}
        layer = dataclasses.replace(layer, sharded_state_dict_keys_map=keys)
    attention = layer.self_attention
    attention = dataclasses.replace(
        attention,
        submodules=dataclasses.replace(attention.submodules, core_attention=SDPAttention),
    )
    layer = dataclasses.replace(
        layer, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm, self_attention=attention
    )
    return dataclasses.replace(spec, submodules=layer)


def final_norm(impl: str) -> type:
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


def model_specs(
    config: TransformerConfig,
    impl: str,
    vwn: VWNShape | None = None,
    vp_stage: int | None = None,
) -> tuple[TransformerBlockSubmodules, MultiTokenPredictionBlockSubmodules | None]:
    """The decoder block this (virtual) pipeline stage builds, and its MTP block (or None).

    With MoE (``config.num_moe_experts``) the layers ``config.moe_layer_freq`` marks, and the
    MTP layers, take the MoE layer spec (as DeepSeek-V3's MTP module does); the rest stay dense.
    With ``vwn`` the stock layer spec is patched into a :class:`VWNTransformerLayer` and the
    final norm becomes the reduce ``D' -> D`` followed by the backbone's final norm; the MTP
    layers become VWN-aware.
    """
    layer_spec = backbone_layer_spec(impl)
    layer_specs = [layer_spec] * config.num_layers
    if config.num_moe_experts:  # MoE where moe_layer_freq (a 0/1 list) says; MTP layers too
        layer_spec = backbone_layer_spec(impl, config.num_moe_experts, config.moe_grouped_gemm)
        layer_specs = [layer_spec if is_moe else layer_specs[0]
                       for is_moe in config.moe_layer_freq]
    norm = final_norm(impl)
    block_norm = norm
    if vwn is not None:
        layer_specs = [vwn_layer_spec(spec, vwn) for spec in layer_specs]
        block_norm = ModuleSpec(module=VWNFinalNorm, params={"vwn": vwn, "final_norm": norm})
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    block = TransformerBlockSubmodules(layer_specs=layer_specs[offset:offset + num_layers],
                                       layer_norm=block_norm)
    return block, mtp_block_spec(config, impl, layer_spec, norm, vwn, vp_stage)
