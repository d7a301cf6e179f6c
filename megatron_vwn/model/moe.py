"""Mixture-of-experts backbones: ``model.moe`` -> Megatron-Core's MoE fields and layer specs.

Everything that routes and computes is Megatron-Core's (docs/moe.md): ``MoELayer`` with its
``TopKRouter`` (softmax or sigmoid scores, aux / sequence aux loss, z-loss, DeepSeek-V3's expert
bias, capacity-based token dropping), the all-to-all token dispatcher and the experts
(``SequentialMLP``; ``TEGroupedMLP`` where Transformer Engine is in use). This module only

* translates the config into ``TransformerConfig`` fields (:func:`transformer_config_fields`),
* says which global layers are MoE (the first ``dense_layers`` stay dense;
  :func:`moe_layer_pattern`; ``model/specs.py`` builds the layer specs from it), and
* makes expert parameters layout-independent for initialisation and comparison: the global
  name of a local expert (:func:`global_expert_name`), the tensor-parallel group that shards it
  (:func:`tensor_shard`), and the router weight drawn per global name (:func:`tag_routers`).

Width members need nothing here: they wrap ``TransformerLayer._forward_mlp``, which calls the
``MoELayer`` exactly as it calls the dense MLP (``model/width/vwn.py``).
"""

from __future__ import annotations

import importlib.util
import re

import torch
from megatron.core import parallel_state

from megatron_vwn.compat.mcore import MTP_INNER_LAYER, moe_loss_coeff_factor
from megatron_vwn.config.schema import Config


def grouped_gemm_available(impl: str) -> bool:
    """Grouped expert GEMMs: Transformer Engine's ``TEGroupedMLP``, or the ``grouped_gemm``
    package on CUDA. Never required: ``SequentialMLP`` runs everywhere else."""
    if impl == "transformer_engine":
        return True
    return torch.cuda.is_available() and importlib.util.find_spec("grouped_gemm") is not None


def moe_layer_pattern(cfg: Config) -> list[bool]:
    """For every global decoder layer: True where its MLP is MoE (all but the first
    ``dense_layers``); empty for a dense model."""
    moe, layers = cfg.model.moe, cfg.model.num_layers
    if not moe.enabled:
        return []
    return [index >= moe.dense_layers for index in range(layers)]


def transformer_config_fields(cfg: Config, impl: str) -> dict:
    """The ``TransformerConfig`` fields of ``model.moe`` and ``parallel.expert*`` (none for a
    dense model, which keeps Megatron-Core's defaults)."""
    moe, par = cfg.model.moe, cfg.parallel
    if not moe.enabled:
        return {}
    factor = moe_loss_coeff_factor(par.tensor, par.sequence_parallel)
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.top_k,
        moe_ffn_hidden_size=moe.expert_ffn_size(cfg.model.ffn_size),
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size or None,
        moe_layer_freq=[int(is_moe) for is_moe in moe_layer_pattern(cfg)],
        moe_router_score_function=moe.router_score,
        moe_router_dtype=moe.router_dtype,
        moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_bias_update_rate=moe.expert_bias_update_rate,
        moe_router_load_balancing_type=moe.aux_loss,
        moe_aux_loss_coeff=factor * moe.aux_loss_coeff if moe.aux_loss != "none" else 0.0,
        moe_z_loss_coeff=factor * moe.z_loss_coeff or None,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_grouped_gemm=grouped_gemm_available(impl),
        expert_model_parallel_size=par.expert,
        expert_tensor_parallel_size=par.etp,
    )


_LOCAL_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)\.")


def is_expert_param(param: torch.nn.Parameter) -> bool:
    """Routed-expert weights: sharded over expert parallelism, reduced over expert-DP only
    (Megatron-Core marks them ``allreduce = False``)."""
    return not getattr(param, "allreduce", True)


def global_expert_name(name: str, param: torch.nn.Parameter) -> str:
    """``...experts.local_experts.<local>...`` -> the same name with the global expert index
    (``ep_rank x local experts + local``), as the single-process model names it."""
    match = _LOCAL_EXPERT.search(name)
    if match is None or not is_expert_param(param):
        return name
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    local = int(match.group(1))
    per_rank = getattr(param, "num_local_experts", None)
    if per_rank is None:
        raise ValueError(f"{name}: expert parameter without num_local_experts")
    return f"{name[:match.start(1)]}{ep_rank * per_rank + local}{name[match.end(1):]}"


def tensor_shard(param: torch.nn.Parameter) -> tuple[int, int, object]:
    """(rank, size, group) of the tensor parallelism that shards ``param``: expert-TP for
    routed experts, TP for everything else."""
    if is_expert_param(param):
        return (parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size(),
                parallel_state.get_expert_tensor_parallel_group())
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_group())


def routers(chunk: torch.nn.Module) -> list[torch.nn.Module]:
    """Every ``TopKRouter`` of one model chunk (decoder and MTP layers), in module order."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [module for module in chunk.modules() if isinstance(module, TopKRouter)]


def router_rows(chunk: torch.nn.Module, num_layers: int) -> list[tuple[int, torch.nn.Module]]:
    """``(global row, router)`` of every MoE layer of one model chunk: decoder layer ``i`` is row
    ``i``, MTP depth ``k`` (0-based) row ``num_layers + k``. Taken from the module tree, not from
    ``router.layer_number``, which releases set differently for MTP layers (0.19: from 1)."""
    rows = []
    for layer in getattr(getattr(chunk, "decoder", None), "layers", []):
        router = getattr(layer.mlp, "router", None)
        if router is not None:
            rows.append((layer.layer_number - 1, router))
    for depth, layer in enumerate(getattr(getattr(chunk, "mtp", None), "layers", [])):
        router = getattr(getattr(layer, MTP_INNER_LAYER).mlp, "router", None)
        if router is not None:
            rows.append((num_layers + depth, router))
    return rows


def tag_routers(chunk: torch.nn.Module) -> None:
    """Mark each router weight (replicated, so skipped by the tensor-parallel re-draw) and each
    local expert weight with what the layout-independent initialisation needs: the router's
    init method, and the number of local experts that maps a local expert to its global index."""
    for module in chunk.modules():
        experts = getattr(module, "local_experts", None)
        if experts is not None:
            for param in module.parameters():
                param.num_local_experts = len(experts)
    for router in routers(chunk):
        router.weight.layout_init = chunk.config.init_method
