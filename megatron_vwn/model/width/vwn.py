"""The wide state inside Megatron-Core's ``TransformerLayer``: the layer subclass and its spec.

:class:`VWNTransformerLayer` carries the wide state ``[s, b, D']`` between layers for every
family member (the member, from the registry, says which of the two kinds it is and names the
slots). Sublayer members (GHC, HC, Frac, mHC) wrap the stock self-attention and MLP
(dense or MoE; local or Transformer Engine submodules) with one connection module each: the
stock residual adds are replaced in the spec by :func:`get_bias_dropout`, so the stock
``_forward_attention`` / ``_forward_mlp`` return the sublayer output ``z`` itself, and the
connection reads the backbone input from, and writes ``z`` back into, the wide state. Layer
members (AltUp) keep the stock layer whole, residual adds included, and wrap it in one module.
Every connection module has the same two methods: ``read(H) -> (x, saved)`` and
``write(y, saved) -> H'``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from megatron_vwn.compat.mcore_internals import forward_attention, forward_mlp
from megatron_vwn.model.width.shape import VWNShape

__all__ = ["VWNShape", "VWNTransformerLayer", "get_bias_dropout", "vwn_layer_spec"]


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
        self.wraps_layer = vwn.wraps_layer
        slots = vwn.member.slots
        # Sublayer members: slot 0 around attention (sublayer 2l), slot 1 around the MLP (2l+1).
        indices = (index,) if vwn.wraps_layer else (2 * index, 2 * index + 1)
        self.connection_slots = slots
        for slot, connection_index in zip(slots, indices, strict=True):
            connection = vwn.make_connection(connection_index, dtype, device)
            setattr(self, slot, connection)  # the slot names are frozen into checkpoint keys
            for param in connection.parameters():
                # Replicated over TP; under SP each rank sees other tokens, so grads are summed.
                param.sequence_parallel = config.sequence_parallel

    def connections(self) -> list[torch.nn.Module]:
        """The connection modules in slot order (attention then MLP, or the one layer module)."""
        return [getattr(self, slot) for slot in self.connection_slots]

    def forward(self, hidden_states, *args, **kwargs):
        kwargs.pop("dynamic_inference_decode_only", None)
        if self.wraps_layer:  # the whole stock layer on the block the member reads
            (connection,) = self.connections()
            x, saved = connection.read(hidden_states)  # [s, b, D]
            y, context = super().forward(x, *args, **kwargs)
            hidden_states = connection.write(y, saved)  # [s, b, D']
        else:
            attention, mlp = self.connections()
            x, saved = attention.read(hidden_states)  # [s, b, D]
            z, context = forward_attention(self, x, *args, **kwargs)
            hidden_states = attention.write(z, saved)  # [s, b, D']
            x, saved = mlp.read(hidden_states)
            z = forward_mlp(self, x, kwargs.get("inference_context"),
                            padding_mask=kwargs.get("padding_mask"))
            hidden_states = mlp.write(z, saved)
        # Like the stock layer: pipeline schedules free stage outputs and refuse views.
        hidden_states = make_viewless_tensor(
            inp=hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True
        )
        return hidden_states, context


def vwn_layer_spec(backbone_spec: ModuleSpec, vwn: VWNShape) -> ModuleSpec:
    """Patch a stock layer spec: our layer class and the VWN shape; for sublayer members the
    residual adds removed (their connection writes the residual)."""
    submodules = backbone_spec.submodules
    if not vwn.wraps_layer:
        submodules = dataclasses.replace(
            submodules, self_attn_bda=get_bias_dropout, mlp_bda=get_bias_dropout
        )
    return ModuleSpec(module=VWNTransformerLayer, submodules=submodules,
                      params={**backbone_spec.params, "vwn": vwn})
