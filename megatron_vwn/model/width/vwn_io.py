"""Where the wide state begins and ends: over-width embedding and the reduce to ``D``.

Shared by every family member; :class:`~megatron_vwn.model.width.shape.VWNShape` says which
variant a model uses.

* :class:`VWNEmbedding` (first stage): Megatron's vocabulary-parallel ``LanguageModelEmbedding``
  producing ``[s, b, D']``: a ``V x D'`` table (``wide``: VWN, AltUp), a ``V x D`` table then
  ``W_expand: D -> D'`` (``factorized``), or the ``D`` embedding replicated ``n`` times
  (``replicated``: HC, mHC, Recycled-AltUp), or the ``D`` embedding plus ``K - 1`` learned
  projections of it, each RMS-matched to it (``projected``: Gemma 3n's dynamic AltUp).
* :class:`VWNFinalNorm` (the stage holding the final norm): GroupNorm over groups of size ``D``
  and ``W_reduce: D' -> D`` sharded over tensor parallelism (each rank owns a slice of ``D'``)
  (``ghc``), or the sum / mean of the ``n`` streams, or AltUp's last computed block (with
  Gemma 3n's AltUp streams ``1..K-1`` first projected back and RMS-matched to stream 0); then the
  backbone's own final norm. It takes the place of the block's ``final_layernorm`` in the spec,
  so ``GPTModel`` hands ``[s, b, D]`` to its output layer.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_vwn.model.width.altup import active_block, init_stream_projections
from megatron_vwn.model.width.altup_reference import rms_matched
from megatron_vwn.model.width.ghc_recompute import RecomputedFinalNorm
from megatron_vwn.model.width.shape import VWNShape


def _device(config: TransformerConfig):
    return torch.device("cpu") if config.use_cpu_initialization else None


def _stream_projections(vwn: VWNShape, config: TransformerConfig) -> torch.nn.Parameter:
    """Gemma 3n's per-stream ``D -> D`` projections ``[K-1, D, D]``, replicated over TP."""
    weight = torch.empty(vwn.n - 1, vwn.hidden, vwn.hidden, dtype=config.params_dtype,
                         device=_device(config))
    param = torch.nn.Parameter(weight)
    param.sequence_parallel = config.sequence_parallel
    param.layout_init = init_stream_projections  # seeded by its global name on CPU
    init_stream_projections(param)
    return param


def _project_streams(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` -> ``[..., K-1, D]``: ``W_i x`` for every projection ``i``."""
    return torch.einsum("...d,ked->...ke", x, weight)


class VWNEmbedding(LanguageModelEmbedding):
    """Token embedding of width ``D'`` (``[s, b, D']``, sequence-scattered under SP)."""

    def __init__(self, config: TransformerConfig, vwn: VWNShape, vocab_size: int,
                 max_sequence_length: int, scatter_to_sequence_parallel: bool = True):
        self.vwn = vwn
        wide_table = vwn.embedding == "wide"
        table_config = dataclasses.replace(config, hidden_size=vwn.width) if wide_table else config
        super().__init__(table_config, vocab_size, max_sequence_length,
                         position_embedding_type="none",
                         scatter_to_sequence_parallel=scatter_to_sequence_parallel)
        self.expand = None
        if vwn.embedding == "factorized":
            weight = torch.empty(vwn.width, vwn.hidden, dtype=config.params_dtype,
                                 device=_device(config))
            self.expand = torch.nn.Parameter(weight)
            self.expand.sequence_parallel = config.sequence_parallel
            self.expand.layout_init = _init_expand
            _init_expand(self.expand)
        self.altup_projections = None
        if vwn.embedding == "projected" and vwn.n > 1:
            self.altup_projections = _stream_projections(vwn, config)

    def forward(self, input_ids, position_ids, tokentype_ids=None):
        embeddings = super().forward(input_ids, position_ids, tokentype_ids)  # [s, b, D or D']
        if self.expand is not None:
            return F.linear(embeddings, self.expand)  # [s, b, D']
        if self.vwn.embedding == "replicated":
            return embeddings.repeat(1, 1, self.vwn.n)  # n copies of the D-wide embedding
        if self.altup_projections is not None:  # stream 0 = e, stream i = RMS-matched W_i e
            streams = rms_matched(_project_streams(embeddings, self.altup_projections),
                                  embeddings.unsqueeze(-2))  # [s, b, K-1, D]
            return torch.cat([embeddings, streams.flatten(-2)], dim=-1)  # [s, b, K*D]
        return embeddings


@torch.no_grad()
def _init_expand(weight: torch.Tensor) -> None:
    """``W_expand = [I_D; G]``: the first ``D`` dims are the table itself (so the backbone reads
    the plain embedding at init), the extra rows ``G ~ N(0, 1/D)`` keep the embedding's scale."""
    hidden = weight.shape[1]
    weight.zero_()
    weight[:hidden].copy_(torch.eye(hidden))
    weight[hidden:].normal_(0.0, 1.0 / math.sqrt(hidden))


class ShardedGroupNorm(torch.nn.Module):
    """GroupNorm over this rank's slice of ``D'`` (whole groups of size ``D`` per rank)."""

    def __init__(self, local_width: int, group_size: int, eps: float, config: TransformerConfig):
        super().__init__()
        self.groups = local_width // group_size
        self.eps = eps
        kwargs = dict(dtype=config.params_dtype, device=_device(config))
        self.weight = torch.nn.Parameter(torch.ones(local_width, **kwargs))
        self.bias = torch.nn.Parameter(torch.zeros(local_width, **kwargs))
        for param in (self.weight, self.bias):
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = F.group_norm(x.reshape(-1, shape[-1]), self.groups, self.weight, self.bias, self.eps)
        return out.reshape(shape)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"weight": 0, "bias": 0}, sharded_offsets
        )


class VWNFinalNorm(MegatronModule):
    """``[s, b, D']`` -> (GroupNorm) -> ``W_reduce`` -> final norm -> ``[s, b, D]``."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 vwn: VWNShape = None, final_norm: type = None):
        super().__init__(config=config)
        self.vwn = vwn
        self.group_norm = None
        self.reduce = None
        tp = config.tensor_model_parallel_size
        if vwn.reduce == "ghc":
            if vwn.group_norm:
                self.group_norm = ShardedGroupNorm(vwn.width // tp, vwn.hidden, eps, config)
            self.reduce = tensor_parallel.RowParallelLinear(
                vwn.width, vwn.hidden, config=config, init_method=config.init_method,
                bias=False, input_is_parallel=True, skip_bias_add=True,
            )
        self.altup_unembed_projections = None
        if vwn.embedding == "projected" and vwn.n > 1:
            self.altup_unembed_projections = _stream_projections(vwn, config)
        self.norm = build_module(final_norm, config=config, hidden_size=hidden_size, eps=eps)
        self.keep_input = False  # set when a multi-token-prediction depth reads the wide state
        self._kept: torch.Tensor | None = None
        self.recompute_chain = None  # recompute=ghc: shared by the chunk (link_recompute_chain)

    def take_input(self) -> torch.Tensor:
        """The wide state of the last forward (kept only with ``keep_input``), handed over once."""
        kept, self._kept = self._kept, None
        if kept is None:
            raise RuntimeError("VWNFinalNorm kept no wide state: forward it with keep_input set")
        return kept

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.keep_input:
            self._kept = hidden
        reduce = self.vwn.reduce
        if reduce in ("sum", "mean", "active"):
            s, b, _ = hidden.shape
            streams = hidden.reshape(s, b, self.vwn.n, self.vwn.hidden)  # [s, b, n, D]
            if self.altup_unembed_projections is not None:  # Gemma 3n: project back, match
                first = streams[:, :, :1]
                others = torch.einsum("sbkd,ked->sbke", streams[:, :, 1:],
                                      self.altup_unembed_projections)
                streams = torch.cat([first, rms_matched(others, first)], dim=2)
            if reduce == "active":  # AltUp: the block the last layer computed
                hidden = streams[:, :, active_block(self.vwn, self.vwn.num_layers - 1)]
            else:
                hidden = streams.sum(dim=2) if reduce == "sum" else streams.mean(dim=2)
        elif self.reduce is not None:
            if self.config.sequence_parallel:
                # Gradients arriving here are complete on every rank: split, do not sum.
                hidden = tensor_parallel.gather_from_sequence_parallel_region(
                    hidden, tensor_parallel_output_grad=False
                )
            source = self._rebuildable_source(hidden)
            hidden = tensor_parallel.scatter_to_tensor_model_parallel_region(hidden)
            if source is None:
                hidden = self._group_norm_and_reduce(hidden)
            else:  # recompute=ghc: neither the GroupNorm's input nor its output kept
                params = [p for module in (self.group_norm, self.reduce) if module is not None
                          for p in module.parameters()]
                hidden = RecomputedFinalNorm.apply(hidden, self._group_norm_and_reduce, source,
                                                   params)
        return self.norm(hidden)

    def _group_norm_and_reduce(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.group_norm is not None:
            hidden = self.group_norm(hidden)  # [s, b, D'/tp]
        hidden, _ = self.reduce(hidden)  # [s(/tp), b, D]
        return hidden

    def _rebuildable_source(self, wide: torch.Tensor):
        """With ``recompute=ghc``, the recipe of the last layer's output ``wide`` when backward
        may rebuild it here: TP = 1 (the GroupNorm reads ``wide`` itself, not a slice), a
        recipe that rebuilds from a kept state in at most two steps, and a ``wide`` that takes
        gradients (the region's parameters get theirs through it); else ``None``."""
        chain = self.recompute_chain
        source = None if chain is None else chain.source_of(wide)
        if (source is None or not torch.is_grad_enabled() or not wide.requires_grad
                or source.depth > 1 or self.config.tensor_model_parallel_size != 1):
            return None
        return source
