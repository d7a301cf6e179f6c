"""Virtual width inside Megatron-Core's ``TransformerLayer``: the layer subclass and its spec.

:class:`VWNTransformerLayer` carries the wide state ``[s, b, D']`` between layers and wraps the
stock self-attention and MLP (dense or MoE; local or Transformer Engine submodules) with one GHC
module each. The stock residual adds are replaced in the spec by :func:`get_bias_dropout`, so the
stock ``_forward_attention`` / ``_forward_mlp`` return the sublayer output ``z`` itself; the GHC
modules then read the backbone input from, and write ``z`` back into, the wide state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from megatron_vwn.config.schema import VwnConfig
from megatron_vwn.model.width.ghc import GHC, hc_init, vwn_init


@dataclass(frozen=True)
class VWNShape:
    """The resolved virtual-width layout of a model (what the modules need from the config)."""

    m: int
    n: int
    hidden: int
    connection: str
    embedding: str
    dynamic: bool
    group_norm: bool
    recompute_coefficients: bool
    output_init_scale: float
    kernel: str = "torch"
    """Dynamic GHC implementation (``model.vwn.kernel``, resolved in ``ghc.resolve_kernel``)."""
    recompute: str = "none"
    """``model.vwn.recompute`` with its alias folded in (``VwnConfig.recompute_mode``)."""

    @classmethod
    def from_config(cls, vwn: VwnConfig, hidden_size: int) -> VWNShape:
        scale = vwn.output_init_scale
        if scale is None:
            scale = 1.0 / math.sqrt(vwn.n) if vwn.connection == "hc" else 1.0
        return cls(m=vwn.m, n=vwn.n, hidden=hidden_size, connection=vwn.connection,
                   embedding=vwn.embedding, dynamic=vwn.dynamic,
                   group_norm=vwn.use_group_norm,
                   recompute_coefficients=vwn.recompute_coefficients,
                   output_init_scale=scale, kernel=vwn.kernel,
                   recompute=vwn.recompute_mode)

    @property
    def d_b(self) -> int:
        return self.hidden // self.m

    @property
    def width(self) -> int:
        """D' = n * d_b."""
        return self.n * self.d_b

    def make_ghc(self, sublayer_index: int, dtype: torch.dtype, device=None) -> GHC:
        """The GHC module around global sublayer ``sublayer_index`` (2l: attention, 2l+1: MLP)."""
        if self.connection == "hc":
            init = hc_init(self.n, sublayer_index)
        else:
            init = vwn_init(self.m, self.n, self.d_b)
        return GHC(self.m, self.n, self.d_b, init, dynamic=self.dynamic,
                   recompute_coefficients=self.recompute_coefficients, dtype=dtype,
                   device=device, kernel=self.kernel, recompute=self.recompute)


def get_bias_dropout(training: bool, fused: bool):
    """Stock ``get_bias_dropout_add`` without the add: the GHC write does the residual."""

    def apply(x_with_bias, residual: torch.Tensor | None, prob: float) -> torch.Tensor:
        x, bias = x_with_bias
        if bias is not None:
            x = x + bias
        return F.dropout(x, p=prob, training=training)

    return apply


class VWNTransformerLayer(TransformerLayer):
    """A stock ``TransformerLayer`` whose residual stream is the wide state ``[s, b, D']``."""

    def __init__(self, config, submodules, layer_number: int = 1, vwn: VWNShape = None,
                 **kwargs):
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        index = self.layer_number - 1  # global, 0-based
        device = torch.device("cpu") if config.use_cpu_initialization else None
        dtype = config.params_dtype
        self.attention_ghc = vwn.make_ghc(2 * index, dtype, device)
        self.mlp_ghc = vwn.make_ghc(2 * index + 1, dtype, device)
        for param in (*self.attention_ghc.parameters(), *self.mlp_ghc.parameters()):
            # Replicated over TP; under SP each rank sees other tokens, so grads are summed.
            param.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states, *args, **kwargs):
        kwargs.pop("dynamic_inference_decode_only", None)
        x, saved = self.attention_ghc.read(hidden_states)  # [s, b, D]
        z, context = self._forward_attention(x, *args, **kwargs)
        hidden_states = self.attention_ghc.write(z, saved)  # [s, b, D']
        x, saved = self.mlp_ghc.read(hidden_states)
        z = self._forward_mlp(x, kwargs.get("inference_context"),
                              padding_mask=kwargs.get("padding_mask"))
        hidden_states = self.mlp_ghc.write(z, saved)
        # Like the stock layer: pipeline schedules free stage outputs and refuse views.
        hidden_states = make_viewless_tensor(
            inp=hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True
        )
        return hidden_states, context


def vwn_layer_spec(backbone_spec: ModuleSpec, vwn: VWNShape) -> ModuleSpec:
    """Patch a stock layer spec: our layer class, residual adds removed, the VWN shape passed."""
    submodules = dataclasses.replace(
        backbone_spec.submodules, self_attn_bda=get_bias_dropout, mlp_bda=get_bias_dropout
    )
    return ModuleSpec(module=VWNTransformerLayer, submodules=submodules,
                      params={**backbone_spec.params, "vwn": vwn})
