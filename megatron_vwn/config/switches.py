"""Checks of the scale switches: LR schedule, activation recompute, FP8 (docs/scale.md).

They live apart from :mod:`megatron_vwn.config.schema` so the schema keeps only the fields;
each check raises one :class:`ConfigError` naming the keys and the allowed values.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from megatron_vwn.config.errors import ConfigError

if TYPE_CHECKING:
    from megatron_vwn.config.schema import Config, TrainConfig


def validate_schedule(train: TrainConfig) -> None:
    """The WSD keys only with ``lr_schedule=wsd``; its decay phase fits after the warmup."""
    if train.lr_wsd_decay_iters is not None and train.lr_wsd_decay_iters <= 0:
        raise ConfigError(f"train.lr_wsd_decay_iters ({train.lr_wsd_decay_iters}) must be > 0")
    if train.lr_schedule != "wsd":
        if train.lr_wsd_decay_iters is not None:
            raise ConfigError(
                f"train.lr_wsd_decay_iters applies to train.lr_schedule=wsd only (got "
                f"{train.lr_schedule}); unset it or set train.lr_schedule=wsd")
        return
    stable_end = train.decay_iters - train.wsd_decay_iters
    if stable_end < train.warmup_iters:
        raise ConfigError(
            f"train.lr_wsd_decay_iters ({train.wsd_decay_iters}) must be <= train.lr_decay_iters "
            f"- train.warmup_iters ({train.decay_iters} - {train.warmup_iters} = "
            f"{train.decay_iters - train.warmup_iters}): the decay starts after the warmup")


def check_tensorboard_available() -> None:
    """Refuse ``logging.tensorboard=on`` in one line when the package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard=on needs the tensorboard package (pip install "
                          "'megatron-vwn[tensorboard]'); allowed here: off")


def validate_switches(cfg: Config) -> None:
    """The checks that need more than one sub-config or the installed packages."""
    if cfg.logging.tensorboard == "on":
        check_tensorboard_available()
    validate_recompute(cfg)
    validate_fp8(cfg)


def validate_recompute(cfg: Config) -> None:
    """``train.recompute*`` keys that fit together, the layout and ``model.vwn.recompute``."""
    from megatron_vwn.config.recompute import layers_per_stage, recomputes_every_layer

    train = cfg.train
    mode = train.recompute
    given = [key for key in ("recompute_method", "recompute_num_layers", "recompute_modules")
             if getattr(train, key) is not None]
    wrong = {"none": given, "selective": [k for k in given if k != "recompute_modules"],
             "full": [k for k in given if k == "recompute_modules"]}[mode]
    if wrong:
        takes = {"none": "none of them", "selective": "train.recompute_modules",
                 "full": "train.recompute_method, train.recompute_num_layers"}[mode]
        raise ConfigError(f"train.{wrong[0]} does not apply to train.recompute={mode} (it takes "
                          f"{takes}); unset it")
    if train.recompute_modules is not None:
        import importlib.util

        from megatron_vwn.compat.mcore import RECOMPUTE_MODULES, RECOMPUTE_NEEDS_TE

        allowed = RECOMPUTE_MODULES
        if importlib.util.find_spec("transformer_engine") is None:
            allowed = tuple(m for m in RECOMPUTE_MODULES if m not in RECOMPUTE_NEEDS_TE)
        bad = [m for m in train.recompute_modules if m not in allowed]
        if bad or not train.recompute_modules:
            why = (f" ({bad[0]} needs Transformer Engine with this Megatron-Core)"
                   if bad and bad[0] in RECOMPUTE_MODULES else "")
            raise ConfigError(f"train.recompute_modules ({train.recompute_modules}) must be a "
                              f"non-empty list of: {', '.join(allowed)}{why}")
    if mode != "full":
        return
    per_stage = layers_per_stage(cfg)
    count = train.recompute_num_layers
    method = train.recompute_method or "uniform"
    if count is not None:
        if count < 1 or count > per_stage or (method == "uniform" and per_stage % count):
            rule = "divide" if method == "uniform" else "be at most"
            raise ConfigError(
                f"train.recompute_num_layers ({count}) must be >= 1 and {rule} the layers of "
                f"a pipeline stage ({per_stage} = model.num_layers / (parallel.pipeline x "
                f"parallel.virtual_pipeline)) with train.recompute_method={method}")
    if cfg.model.mtp.num_layers and method == "uniform" and (count or 1) != 1:
        raise ConfigError(
            f"train.recompute_num_layers ({count}) must be 1 with train.recompute_method=uniform "
            f"and model.mtp.num_layers > 0 (Megatron-Core recomputes MTP layers one at a time)")
    vwn = cfg.model.vwn
    if vwn.enabled and vwn.recompute_mode != "none" and recomputes_every_layer(cfg):
        key = ("model.vwn.recompute" if vwn.recompute != "none"
               else "model.vwn.recompute_coefficients")
        raise ConfigError(
            f"{key} ({vwn.recompute_mode}) does nothing useful with train.recompute=full over "
            f"every layer (a layer keeps only its input; its connections are recomputed with "
            f"it): unset {key}, or recompute fewer layers (train.recompute_method=block)")


def validate_fp8(cfg: Config) -> None:
    """FP8 needs CUDA, Transformer Engine and its layer spec; refused here otherwise."""
    import importlib.util

    train = cfg.train
    if train.precision != "fp8":
        if train.fp8_first_last_bf16:
            raise ConfigError("train.fp8_first_last_bf16=true needs train.precision=fp8")
        return
    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        raise ConfigError(
            "train.precision=fp8 needs a CUDA GPU and Transformer Engine (the 'gpu' extra), "
            "which this machine lacks; allowed here: auto, fp32, bf16")
    if cfg.model.transformer_impl == "local":
        raise ConfigError("train.precision=fp8 needs model.transformer_impl=auto or "
                          "transformer_engine (FP8 GEMMs are Transformer Engine's), not local")
    if train.fp8_first_last_bf16 and train.fp8_recipe == "delayed":
        raise ConfigError("train.fp8_first_last_bf16=true does not go with "
                          "train.fp8_recipe=delayed (Megatron-Core refuses it); allowed: "
                          "tensorwise, mxfp8, blockwise")
    if train.fp8_recipe == "mxfp8" and torch.cuda.get_device_capability()[0] < 10:
        raise ConfigError("train.fp8_recipe=mxfp8 needs a Blackwell GPU (compute capability "
                          ">= 10); allowed here: delayed, tensorwise, blockwise")
