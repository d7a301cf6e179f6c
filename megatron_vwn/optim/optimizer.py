"""Megatron-Core optimizer (AdamW, optionally distributed); the LR schedule is in
:mod:`megatron_vwn.optim.schedule`."""

from __future__ import annotations

from megatron.core.optimizer import (
    MegatronOptimizer,
    OptimizerConfig,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import ParamGroupOverride

from megatron_vwn.compat.cpu import cpu_mode
from megatron_vwn.config.schema import Config


def use_distributed_optimizer(cfg: Config) -> bool:
    """Default: shard optimizer state on GPU; the plain optimizer on CPU (PLATFORM.md)."""
    if cfg.parallel.distributed_optimizer is None:
        return not cpu_mode()
    return cfg.parallel.distributed_optimizer


def build_optimizer(cfg: Config, model_chunks: list, bf16: bool) -> MegatronOptimizer:
    """AdamW over the DDP-wrapped chunks.

    No weight decay on biases, 1-D parameters (norm gains) and parameters tagged
    ``no_weight_decay`` (VWN's static GHC coefficients and scales); everything else decays.
    """
    train = cfg.train
    config = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.clip_grad,
        bf16=bf16,
        use_distributed_optimizer=use_distributed_optimizer(cfg),
    )
    overrides = get_standard_config_overrides(config)
    overrides[ParamKey(attr="no_weight_decay")] = ParamGroupOverride(wd_mult=0.0)
    return get_megatron_optimizer(config, model_chunks, config_overrides=overrides)

