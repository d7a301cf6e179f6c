"""Checks across sub-configs and against the launch layout, run before any process group.

Each failure is one :class:`ConfigError` line naming the keys involved and what is allowed.
"""

from __future__ import annotations

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.schema import Config
from megatron_vwn.config.switches import validate_switches


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Validate ``cfg``; with ``world_size`` also the data-parallel layout it implies."""
    cfg.model.validate()
    cfg.parallel.validate()
    cfg.train.validate()
    cfg.data.validate()
    cfg.logging.validate()
    cfg.checkpoint.validate()
    cfg.analysis.validate()
    cfg.debug.validate()
    validate_switches(cfg)
    model, par = cfg.model, cfg.parallel
    if cfg.analysis.interaction_interval and model.mtp.num_layers:
        raise ConfigError(
            "analysis.interaction_interval > 0 needs model.mtp.num_layers=0 (the AGOP probes the "
            "main head's logits, which GPTModel does not return with MTP heads)"
        )

    if model.num_attention_heads % par.tensor:
        raise ConfigError(
            f"parallel.tensor ({par.tensor}) must divide model.num_attention_heads "
            f"({model.num_attention_heads})"
        )
    if model.query_groups % par.tensor:
        raise ConfigError(
            f"parallel.tensor ({par.tensor}) must divide model.num_query_groups "
            f"({model.query_groups})"
        )
    if model.ffn_size % par.tensor:
        raise ConfigError(
            f"parallel.tensor ({par.tensor}) must divide model.ffn_hidden_size ({model.ffn_size})"
        )
    _validate_vwn_layout(cfg)
    _validate_moe_layout(cfg)
    vwn = model.vwn
    if (model.mtp.num_layers and par.pipeline > 1 and vwn.enabled
            and vwn.resolved_embedding == "factorized"):
        raise ConfigError(
            "model.mtp.num_layers > 0 with parallel.pipeline > 1 needs the MTP stage's copy of "
            "the embedding kept in sync, which Megatron-Core does for the table only, not for "
            "W_expand: use model.vwn.embedding=wide or parallel.pipeline=1"
        )
    if (model.mtp.num_layers and par.pipeline > 1 and vwn.enabled
            and vwn.resolved_embedding == "projected"):
        raise ConfigError(
            "model.mtp.num_layers > 0 with parallel.pipeline > 1 needs the MTP stage's copy of "
            "the embedding kept in sync, which Megatron-Core does for the table only, not for "
            "dynamic AltUp's stream projections: use model.vwn.dynamic=false or "
            "parallel.pipeline=1"
        )
    stages = par.pipeline * par.vpp
    if model.num_layers % stages:
        raise ConfigError(
            f"model.num_layers ({model.num_layers}) must be divisible by parallel.pipeline x "
            f"parallel.virtual_pipeline ({par.pipeline} x {par.vpp} = {stages})"
        )
    if par.sequence_parallel and model.seq_length % par.tensor:
        raise ConfigError(
            f"model.seq_length ({model.seq_length}) must be divisible by parallel.tensor "
            f"({par.tensor}) with parallel.sequence_parallel=true"
        )
    if cfg.train.global_batch_size % cfg.train.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size ({cfg.train.global_batch_size}) must be divisible by "
            f"train.micro_batch_size ({cfg.train.micro_batch_size})"
        )
    if world_size is not None:
        validate_world_size(cfg, world_size)


def _validate_vwn_layout(cfg: Config) -> None:
    """The reduce ``D' -> D`` is sharded over TP by slices of ``D'``; GroupNorm needs whole
    groups (of size D) on every rank."""
    vwn, tp = cfg.model.vwn, cfg.parallel.tensor
    if not vwn.enabled or vwn.resolved_reduce != "ghc" or tp == 1:
        return
    width = vwn.n * (cfg.model.hidden_size // vwn.m)
    if width % tp:
        raise ConfigError(
            f"parallel.tensor ({tp}) must divide the virtual width D' = model.vwn.n x "
            f"model.hidden_size / model.vwn.m ({width})"
        )
    if vwn.use_group_norm and (vwn.n // vwn.m) % tp:
        raise ConfigError(
            f"parallel.tensor ({tp}) must divide r = model.vwn.n / model.vwn.m "
            f"({vwn.n // vwn.m}) while the GroupNorm is on (each rank holds whole groups of "
            f"size D); use model.vwn.group_norm=off or a tensor size dividing r"
        )


def _validate_moe_layout(cfg: Config) -> None:
    """Expert parallelism needs experts, and Megatron-Core's MoE layer needs sequence parallelism
    under tensor parallelism (it refuses to train without it)."""
    moe, par = cfg.model.moe, cfg.parallel
    if not moe.enabled:
        if par.expert > 1 or par.expert_tensor is not None:
            key = (f"parallel.expert ({par.expert})" if par.expert > 1
                   else f"parallel.expert_tensor ({par.expert_tensor})")
            raise ConfigError(f"{key} needs model.moe.num_experts > 0 (got 0: a dense model); "
                              f"allowed: parallel.expert=1 and parallel.expert_tensor unset")
        return
    if moe.num_experts % par.expert:
        raise ConfigError(f"parallel.expert ({par.expert}) must divide model.moe.num_experts "
                          f"({moe.num_experts})")
    expert_ffn = moe.expert_ffn_size(cfg.model.ffn_size)
    if expert_ffn % par.etp:
        raise ConfigError(f"parallel.expert_tensor ({par.etp}; defaults to parallel.tensor) must "
                          f"divide the expert width model.moe.ffn_hidden_size ({expert_ffn})")
    if moe.shared_expert_ffn_hidden_size % par.tensor:
        raise ConfigError(f"parallel.tensor ({par.tensor}) must divide "
                          f"model.moe.shared_expert_ffn_hidden_size "
                          f"({moe.shared_expert_ffn_hidden_size})")
    if par.tensor > 1 and not par.sequence_parallel:
        raise ConfigError("model.moe.num_experts > 0 with parallel.tensor > 1 needs "
                          "parallel.sequence_parallel=true (Megatron-Core's MoE layer trains "
                          "only with it)")


def validate_world_size(cfg: Config, world_size: int) -> None:
    """World = tensor x pipeline x data, and the global batch splits over data-parallel ranks."""
    par, train = cfg.parallel, cfg.train
    model_parallel = par.tensor * par.pipeline
    if world_size % model_parallel:
        raise ConfigError(
            f"the number of processes ({world_size}) must be a multiple of parallel.tensor x "
            f"parallel.pipeline ({par.tensor} x {par.pipeline} = {model_parallel}); "
            f"allowed: {model_parallel}, {2 * model_parallel}, {3 * model_parallel}, ..."
        )
    expert_parallel = par.etp * par.expert * par.pipeline
    if cfg.model.moe.enabled and world_size % expert_parallel:
        raise ConfigError(
            f"the number of processes ({world_size}) must be a multiple of "
            f"parallel.expert_tensor x parallel.expert x parallel.pipeline ({par.etp} x "
            f"{par.expert} x {par.pipeline} = {expert_parallel}; parallel.expert_tensor "
            f"defaults to parallel.tensor): Megatron-Core lays the experts out over the same "
            f"ranks; allowed: a multiple of {expert_parallel}, or parallel.expert_tensor=1")
    dp = world_size // model_parallel
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({train.global_batch_size}) must be divisible by "
            f"train.micro_batch_size x data-parallel size ({train.micro_batch_size} x {dp} = "
            f"{per_step})"
        )
    microbatches = train.global_batch_size // per_step
    if par.vpp > 1 and microbatches % par.pipeline:
        raise ConfigError(
            f"with parallel.virtual_pipeline ({par.vpp}) the number of micro-batches per step "
            f"({microbatches} = train.global_batch_size / (train.micro_batch_size x {dp} "
            f"data-parallel)) must be a multiple of parallel.pipeline ({par.pipeline})"
        )
