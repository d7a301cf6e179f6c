"""FP8 through Transformer Engine: ``train.precision=fp8`` -> ``TransformerConfig`` fields
(docs/scale.md).

FP8 covers the GEMMs of the Transformer Engine linear layers (QKV, attention output, MLP) only;
weights, optimizer state and everything else stay in bf16/fp32. The width connections (GHC, mHC,
AltUp) are plain PyTorch modules outside Transformer Engine: their coefficient GEMMs, norms and
reduce run in bf16 with fp32 statistics, as under ``precision=bf16``. Only the ``hybrid`` format
(e4m3 forward, e5m2 gradients) is used, the one Megatron-LM recommends for training.
"""

from __future__ import annotations

from megatron_vwn.config.schema import TrainConfig

FP8_FORMAT = "hybrid"


def fp8_fields(train: TrainConfig) -> dict:
    """The FP8 keywords of ``TransformerConfig``; empty unless ``train.precision=fp8``."""
    if train.precision != "fp8":
        return {}
    return {"fp8": FP8_FORMAT, "fp8_recipe": train.fp8_recipe,
            "first_last_layers_bf16": train.fp8_first_last_bf16}
