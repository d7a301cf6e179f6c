"""Activation recompute: ``train.recompute*`` -> Megatron-Core's ``TransformerConfig`` fields
(docs/scale.md).

Megatron-Core does the work: ``selective`` checkpoints the chosen submodules inside each
``TransformerLayer`` (core attention, the norms, the MLP), ``full`` checkpoints whole layers in
``TransformerBlock`` (``uniform``: every layer, in units of ``recompute_num_layers``; ``block``:
the first ``recompute_num_layers`` of each pipeline stage). A fully recomputed VWN layer is
recomputed with its width connections, since they live inside the layer's ``forward``. On CPU
the RNG states its checkpoints save and restore are the CPU ones (``compat/cpu.py``), so a
recomputed forward draws the same dropout masks.
"""

from __future__ import annotations

from megatron_vwn.config.schema import Config

SELECTIVE_DEFAULT = ["core_attn"]


def layers_per_stage(cfg: Config) -> int:
    """Transformer layers in one (virtual) pipeline stage: the span ``full`` recompute covers."""
    return cfg.model.num_layers // (cfg.parallel.pipeline * cfg.parallel.vpp)


def resolved(cfg: Config) -> tuple[str | None, int | None, list[str]]:
    """``(recompute_method, recompute_num_layers, recompute_modules)`` as Megatron-Core takes
    them, defaults filled in."""
    train = cfg.train
    modules = list(train.recompute_modules or SELECTIVE_DEFAULT)
    if train.recompute != "full":
        return None, None, modules
    method = train.recompute_method or "uniform"
    if train.recompute_num_layers is not None:
        return method, train.recompute_num_layers, modules
    return method, 1 if method == "uniform" else layers_per_stage(cfg), modules


def recompute_fields(cfg: Config) -> dict:
    """The recompute keywords of ``TransformerConfig``."""
    if cfg.train.recompute == "none":
        return {}
    method, num_layers, modules = resolved(cfg)
    return {"recompute_granularity": cfg.train.recompute, "recompute_method": method,
            "recompute_num_layers": num_layers, "recompute_modules": modules}


def recomputes_every_layer(cfg: Config) -> bool:
    """Whether ``full`` recompute covers every layer of every stage."""
    method, num_layers, _ = resolved(cfg)
    return cfg.train.recompute == "full" and (
        method == "uniform" or num_layers >= layers_per_stage(cfg))
