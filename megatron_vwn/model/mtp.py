"""Multi-token (next-N) prediction heads: Megatron-Core's MTP block, and its VWN-aware layer.

Backbone (``r = 1``): Megatron-Core's ``MultiTokenPredictionLayer`` unchanged (enorm, hnorm,
``eh_proj: 2D -> D``, one transformer layer, final norm; the LM head shared), with our norms on
the local spec. ``GPTModel`` computes each depth's loss and injects its gradient through
``MTPLossAutoScaler``.

Virtual width (docs/methods.md §1.5, VWN Sec. 3.4): :class:`VWNMultiTokenPredictionLayer` keeps
Megatron's layer (shifted-token embedding, the causal chain across depths, recompute and the
loss plumbing in ``GPTModel``) and changes what is wide:

    e = E-norm(wide embedding of the shifted tokens)       [s, b, D']
    h = H-norm(wide state of depth k-1)                    [s, b, D']  (main model for k = 1)
    x = BlockLinear([e_i ; h_i]) for every segment i       [s, b, n, 2 d_b] -> [s, b, D']
    x = VWN layer(x)  (its two GHC modules)                [s, b, D']
    out = final norm(reduce(GroupNorm(x)))                 [s, b, D]  -> shared LM head

``GPTModel`` hands each MTP layer the *reduced* output of the previous depth; the wide state is
taken from the previous depth's :class:`VWNFinalNorm`, which keeps its input when asked to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    get_mtp_layer_spec,
    get_mtp_num_layers_to_build,
)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vwn.compat.mcore import mtp_layer_submodules
from megatron_vwn.compat.mcore_internals import MTPLayerWithInputMix
from megatron_vwn.model.norm import RMSNorm
from megatron_vwn.model.width.vwn import VWNShape, vwn_layer_spec
from megatron_vwn.model.width.vwn_io import VWNFinalNorm


class BlockLinear(torch.nn.Module):
    """``Linear(2 d_b -> d_b)`` applied to ``[e_i ; h_i]`` of every segment, shared by all ``n``
    segments (a dense ``2D' -> D'`` mixer would cost ``4 r^2 D^2``). Replicated over TP."""

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig,
                 init_method, vwn: VWNShape, **unused):
        super().__init__()
        self.n, self.d_b = vwn.n, vwn.d_b
        device = torch.device("cpu") if config.use_cpu_initialization else None
        weight = torch.empty(vwn.d_b, 2 * vwn.d_b, dtype=config.params_dtype, device=device)
        self.weight = torch.nn.Parameter(weight)
        self.weight.sequence_parallel = config.sequence_parallel
        self.weight.layout_init = init_method
        with torch.no_grad():
            init_method(self.weight)

    def forward(self, embedded: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        s, b, width = hidden.shape
        pairs = torch.cat([embedded.reshape(s, b, self.n, self.d_b),
                           hidden.reshape(s, b, self.n, self.d_b)], dim=-1)  # [s, b, n, 2 d_b]
        return F.linear(pairs, self.weight).reshape(s, b, width)


class VWNMultiTokenPredictionLayer(MTPLayerWithInputMix):
    """Megatron's MTP layer on the wide state (see the module docstring)."""

    def __init__(self, config, submodules, layer_number: int = 1, vwn: VWNShape = None,
                 **kwargs):
        # kwargs: what the release's MTP block passes (vp_stage, pg_collection; 0.19 adds more)
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        eps = config.layernorm_epsilon
        self.enorm = build_module(submodules.enorm, config=config, hidden_size=vwn.width, eps=eps)
        self.hnorm = build_module(submodules.hnorm, config=config, hidden_size=vwn.width, eps=eps)
        self._wide_source: list[VWNFinalNorm] = []

    def read_wide_state_from(self, final_norm: VWNFinalNorm) -> None:
        """Take depth k-1's wide state from that depth's final norm (not a submodule)."""
        final_norm.keep_input = True
        self._wide_source = [final_norm]

    def mix_inputs(self, hidden_states: torch.Tensor, decoder_input: torch.Tensor):
        return self.eh_proj(self.enorm(decoder_input), self.hnorm(hidden_states))

    def forward(self, input_ids, position_ids, hidden_states, attention_mask, **kwargs):
        wide = self._wide_source[0].take_input()  # replaces the reduced [s, b, D] input
        return super().forward(input_ids, position_ids, wide, attention_mask, **kwargs)


def mtp_block_spec(config: TransformerConfig, impl: str, layer_spec: ModuleSpec,
                   final_norm: type, vwn: VWNShape | None, vp_stage: int | None):
    """The MTP block of this (virtual) pipeline stage, or None where it holds no MTP layer."""
    count = get_mtp_num_layers_to_build(config, vp_stage=vp_stage)
    if not count:
        return None
    if vwn is not None:
        layer = ModuleSpec(
            module=VWNMultiTokenPredictionLayer,
            submodules=mtp_layer_submodules(
                enorm=final_norm, hnorm=final_norm,
                eh_proj=ModuleSpec(module=BlockLinear, params={"vwn": vwn}),
                layer=vwn_layer_spec(layer_spec, vwn),
                layer_norm=ModuleSpec(module=VWNFinalNorm,
                                      params={"vwn": vwn, "final_norm": final_norm}),
            ),
            params={"vwn": vwn},
        )
    elif impl == "transformer_engine":
        layer = get_mtp_layer_spec(layer_spec, use_transformer_engine=True)
    else:
        layer = ModuleSpec(
            module=MultiTokenPredictionLayer,
            submodules=mtp_layer_submodules(
                enorm=RMSNorm, hnorm=RMSNorm, eh_proj=ColumnParallelLinear,
                layer=layer_spec, layer_norm=RMSNorm,
            ),
        )
    return MultiTokenPredictionBlockSubmodules(layer_specs=[layer] * count)


def chain_wide_states(model) -> None:
    """Depth 1 reads the main model's wide state, depth k the wide state of depth k-1."""
    mtp = getattr(model, "mtp", None)
    if mtp is None or not isinstance(mtp.layers[0], VWNMultiTokenPredictionLayer):
        return
    source = model.decoder.final_layernorm
    for layer in mtp.layers:
        layer.read_wide_state_from(source)
        source = layer.final_layernorm


class MTPLossRecorder:
    """Keeps the per-token losses ``GPTModel`` computes for each MTP depth, for logging.

    ``GPTModel`` calls ``compute_language_model_loss`` once per depth (1..K), then once for the
    main loss; this wrapper records the first K results (detached) of each forward.
    """

    def __init__(self, compute_loss, depths: int):
        self.compute_loss = compute_loss
        self.depths = depths
        self.losses: list[torch.Tensor] = []

    def __call__(self, labels, logits):
        loss = self.compute_loss(labels, logits)
        if len(self.losses) < self.depths:
            self.losses.append(loss.detach())
        return loss

    def take(self) -> list[torch.Tensor]:
        losses, self.losses = self.losses, []
        return losses
