"""RMSNorm for the local (non-Transformer-Engine) spec.

Megatron-Core's local spec wraps ``torch.nn.RMSNorm`` (``WrappedTorchNorm``), which refuses
sequence parallelism. Under SP every tensor-parallel rank normalises a different slice of the
sequence with the same replicated gain, so the gain's gradient must be all-reduced across the
TP group: ``finalize_model_grads`` does that for parameters tagged ``sequence_parallel``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """``y = x / rms(x) * g`` over the last dimension, in the module's parameter dtype.

    Takes the constructor arguments Megatron-Core passes to a spec's norm, so it drops into
    ``input_layernorm``, ``pre_mlp_layernorm`` and the block's final norm.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ):
        super().__init__()
        if normalization != "RMSNorm" or zero_centered_gamma:
            raise ValueError("megatron_vwn.model.norm.RMSNorm supports plain RMSNorm only")
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=_device(config))
        )
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _device(config: TransformerConfig) -> torch.device:
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
