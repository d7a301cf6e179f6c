"""``VWNForCausalLM``: Virtual Width Networks (and hyper-/frac-connections) for transformers.

Self-contained (torch + transformers), written by ``megatron-vwn convert hf`` next to the weights
of a megatron-vwn model, with each width member's plain-torch reference of its equations
(``ghc_reference.py``, ``mhc_reference.py``, ``altup_reference.py``, ...) copied beside it and
``vwn_members.py``, which the exporter writes from its registry of members: ``vwn_connection``
-> the reference's ``hf_connection(config, active)`` builder, whether the member wraps the whole
layer, and the layer's module names for it. This file names no member; it reproduces the
model's forward pass. Tensors are ``[b, s, ...]``.

Backbone (Llama): RMSNorm pre-norm, grouped-query attention with rotate-half RoPE, SwiGLU MLP.
Virtual width (VWN arXiv 2511.11238, HC 2409.19606, FC 2503.14125, mHC 2512.24880, AltUp
2301.13310): the residual stream is a wide state of ``D' = n * d_b`` (``d_b = D / m``). Sublayer
members (GHC and its presets HC and Frac, mHC) wrap attention and the MLP; layer members (AltUp)
wrap the whole layer, residual included. Their equations are in the reference modules beside
this file, the same files megatron-vwn checks its training modules against.

Input (``vwn_embedding``): ``wide`` table ``V x D'``, ``factorized`` ``V x D`` then
``W_expand: D -> D'``, ``replicated`` (the ``D`` embedding copied ``n`` times: HC, mHC,
Recycled-AltUp), ``projected`` (Gemma 3n: stream ``i > 0`` is ``W_i e`` RMS-matched to ``e``) or
``none`` (``D' = D``). Output (``vwn_reduce``): GroupNorm (groups of ``D``) and
``W_reduce: D' -> D`` (VWN), the sum / mean of the ``n`` streams or AltUp's last computed block
(Gemma 3n's streams ``i > 0`` first projected back and RMS-matched), or nothing (Frac), then the
final RMSNorm and the LM head. ``vwn_connection = "none"`` is the plain residual backbone.

Mixture of experts (``moe_num_experts > 0``): from layer ``moe_dense_layers`` on (MTP layers
too) the MLP is :class:`VWNMoE` (Megatron-Core's routing: softmax over the top-k logits, or
sigmoid scores with DeepSeek-V3's expert bias; a shared expert), under Mixtral's names
``block_sparse_moe.gate`` / ``experts.{e}.w1, w2, w3``; every connection wraps it as it wraps
the dense MLP.

Multi-token prediction heads (``config.num_mtp_layers``) are loaded with the model but unused by
``forward`` and ``generate``; :meth:`VWNForCausalLM.mtp_logits` returns their next-N logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .altup_reference import rms_matched  # the projected entry (Gemma 3n)
from .configuration_vwn import VWNConfig
from .vwn_members import MEMBERS

# transformers 5.24 renamed the outputs' and ``forward``'s ``past_key_values`` to ``cache``
# (``generate()`` passes ``cache=``); the old name is what 5.23 and earlier use.
CACHE_KEY = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
             else "past_key_values")


def _cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache under either name (``cache`` from 5.24 on, ``past_key_values`` before)."""
    return cache if cache is not None else past_key_values


class VWNRMSNorm(nn.Module):
    """``x / rms(x) * g`` over the last dimension (as megatron-vwn: ``F.rms_norm``)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_cos_sin(config: VWNConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """``cos, sin`` ``[b, s, head_dim]`` of rotate-half RoPE (fp32 angles, cast to ``dtype``)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (
        torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim))
    freqs = position_ids[..., None].float() * inv_freq  # [b, s, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VWNAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE and a KV cache (SDPA)."""

    def __init__(self, config: VWNConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.groups = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.groups * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.groups * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)

    def forward(self, x, cos, sin, mask, cache: Cache | None):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.groups, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.groups, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [b, 1, s, d]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        gqa = self.groups != self.heads
        if mask is None:  # no padding: causal over a fresh sequence, or one new token
            out = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class VWNMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: VWNConfig, inner: int | None = None):
        super().__init__()
        hidden, inner = config.hidden_size, inner or config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VWNRouter(nn.Module):
    """The MoE router's parameters: ``weight`` ``[E, D]`` and (DeepSeek-V3) ``expert_bias``."""

    def __init__(self, config: VWNConfig):
        super().__init__()
        experts = config.moe_num_experts
        self.weight = nn.Parameter(torch.empty(experts, config.hidden_size))
        if config.moe_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(experts, dtype=torch.float32))
        else:
            self.expert_bias = None


class VWNExpert(nn.Module):
    """One SwiGLU expert in Mixtral's names: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inner, bias=False)
        self.w3 = nn.Linear(hidden, inner, bias=False)
        self.w2 = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class VWNMoE(nn.Module):
    """Megatron-Core's MoE layer for inference (megatron-vwn docs/moe.md), ``x`` ``[b, s, D]``:

        logits = x W_g^T (fp32)                                   [T, E]
        softmax router: top-k of the logits, weights = softmax over those k (Mixtral)
        sigmoid router: s = sigmoid(logits); top-k of s + expert_bias; weights = s_k / sum s_k
        y = sum_k weight_k expert_k(x) + shared_expert(x)
    """

    def __init__(self, config: VWNConfig):
        super().__init__()
        self.top_k, self.score = config.moe_top_k, config.moe_router_score
        self.gate = VWNRouter(config)
        self.experts = nn.ModuleList(
            VWNExpert(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.moe_num_experts))
        self.shared_expert = VWNMLP(config, config.moe_shared_intermediate_size) \
            if config.moe_shared_intermediate_size else None

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expert indices [T, k], weights [T, k])`` of every token."""
        logits = F.linear(flat.float(), self.gate.weight.float())
        if self.score == "softmax":
            top, chosen = logits.topk(self.top_k, dim=-1)
            return chosen, top.softmax(dim=-1)
        scores = torch.sigmoid(logits)
        bias = self.gate.expert_bias
        chosen = (scores + bias if bias is not None else scores).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        if self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return chosen, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        chosen, weights = self.route(flat)
        out = torch.zeros_like(flat)
        for index, expert in enumerate(self.experts):
            token, slot = (chosen == index).nonzero(as_tuple=True)
            if token.numel():
                scaled = expert(flat[token]) * weights[token, slot, None].to(flat.dtype)
                out.index_add_(0, token, scaled)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.reshape(x.shape)


def width_member(config: VWNConfig):
    """``(build, wraps_layer, names)`` of ``config.vwn_connection`` (see ``vwn_members.py``), or
    None for the plain backbone (``none``)."""
    if not config.has_width:
        return None
    if config.vwn_connection not in MEMBERS:
        raise ValueError(f"vwn_connection ({config.vwn_connection!r}) must be one of "
                         f"{sorted(MEMBERS) + ['none']} (the members this export carries)")
    return MEMBERS[config.vwn_connection]


class VWNDecoderLayer(nn.Module):
    """Pre-norm attention and SwiGLU. A sublayer member puts one connection around each (its two
    modules, attention's first), a layer member one around the whole residual layer; the plain
    backbone adds the residual."""

    def __init__(self, config: VWNConfig, layer_idx: int, active: int = 0):
        super().__init__()
        self.input_layernorm = VWNRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = VWNAttention(config, layer_idx)
        self.post_attention_layernorm = VWNRMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = config.is_moe_layer(layer_idx)  # Mixtral's name for the MoE block
        self.mlp = None if moe else VWNMLP(config)
        self.block_sparse_moe = VWNMoE(config) if moe else None
        member = width_member(config)
        self.wraps_layer = member is None or member[1]
        self.connection_names = member[2] if member is not None else ()
        for name in self.connection_names:  # the HF key names the exporter wrote
            setattr(self, name, member[0](config, active))

    def forward(self, hidden, cos, sin, mask, cache):
        mlp = self.mlp if self.mlp is not None else self.block_sparse_moe
        connections = [getattr(self, name) for name in self.connection_names]
        if self.wraps_layer:
            x, saved = connections[0].read(hidden) if connections else (hidden, None)
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
            x = x + mlp(self.post_attention_layernorm(x))
            return connections[0].write(x, saved) if connections else x
        attention, feed_forward = connections
        x, saved = attention.read(hidden)
        hidden = attention.write(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache),
                                 saved)
        x, saved = feed_forward.read(hidden)
        return feed_forward.write(mlp(self.post_attention_layernorm(x)), saved)


class VWNOutputNorm(nn.Module):
    """Wide state ``[b, s, D']`` -> ``[b, s, D]``: (GroupNorm +) reduce, HC's sum, or nothing;
    then the final RMSNorm."""

    def __init__(self, config: VWNConfig):
        super().__init__()
        self.mode = config.vwn_reduce
        self.exit_block = config.altup_exit_block
        self.n, self.hidden = config.vwn_n, config.hidden_size
        wide = config.wide_size
        self.groups = wide // config.hidden_size
        self.eps = config.rms_norm_eps
        self.group_norm = None
        self.reduce = None
        if self.mode == "ghc":
            if config.vwn_group_norm:
                self.group_norm = nn.GroupNorm(self.groups, wide, eps=config.rms_norm_eps)
            self.reduce = nn.Linear(wide, config.hidden_size, bias=False)
        self.altup_unembed_projections = None
        if config.vwn_embedding == "projected" and self.n > 1:
            d = config.hidden_size
            self.altup_unembed_projections = nn.Parameter(torch.zeros(self.n - 1, d, d))
        self.norm = VWNRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mode in ("sum", "mean", "active"):
            b, s, _ = hidden.shape
            streams = hidden.reshape(b, s, self.n, self.hidden)
            if self.altup_unembed_projections is not None:
                first = streams[:, :, :1]
                others = torch.einsum("bskd,ked->bske", streams[:, :, 1:],
                                      self.altup_unembed_projections)
                streams = torch.cat([first, rms_matched(others, first)], dim=2)
            if self.mode == "active":
                hidden = streams[:, :, self.exit_block]
            else:
                hidden = streams.sum(dim=2) if self.mode == "sum" else streams.mean(dim=2)
        elif self.reduce is not None:
            if self.group_norm is not None:
                shape = hidden.shape
                hidden = F.group_norm(hidden.reshape(-1, shape[-1]), self.groups,
                                      self.group_norm.weight, self.group_norm.bias,
                                      self.eps).reshape(shape)
            hidden = self.reduce(hidden)
        return self.norm(hidden)


class VWNEmbedding(nn.Module):
    """Token ids ``[b, s]`` -> the initial wide state ``[b, s, D']``."""

    def __init__(self, config: VWNConfig):
        super().__init__()
        kind = config.vwn_embedding if config.has_width else "none"
        self.n = config.vwn_n
        width = config.wide_size if kind == "wide" else config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, width)
        self.replicate = kind == "replicated"
        self.expand = None
        if kind == "factorized" and config.wide_size > config.hidden_size:
            self.expand = nn.Linear(config.hidden_size, config.wide_size, bias=False)
        self.altup_projections = None
        if kind == "projected" and self.n > 1:
            d = config.hidden_size
            self.altup_projections = nn.Parameter(torch.zeros(self.n - 1, d, d))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedded = self.embed_tokens(input_ids)
        if self.expand is not None:
            return self.expand(embedded)
        if self.replicate:
            return embedded.repeat(1, 1, self.n)
        if self.altup_projections is not None:
            streams = torch.einsum("bsd,ked->bske", embedded, self.altup_projections)
            streams = rms_matched(streams, embedded.unsqueeze(-2))
            return torch.cat([embedded, streams.flatten(-2)], dim=-1)
        return embedded


@dataclass
class VWNModelOutput(BaseModelOutputWithPast):
    """``last_hidden_state`` ``[b, s, D]`` (after the output norm), the KV cache (field
    ``CACHE_KEY``) and ``wide_hidden_state`` ``[b, s, D']`` (the residual stream before the
    norm)."""

    wide_hidden_state: torch.Tensor | None = None


class VWNPreTrainedModel(PreTrainedModel):
    config_class = VWNConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["VWNDecoderLayer"]
    _skip_keys_device_placement = [CACHE_KEY]

    @torch.no_grad()
    def _init_weights(self, module):
        """Init for weights a checkpoint does not provide (training-style; width connections at
        their reference's ``reset_parameters``)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding, VWNRouter)):
            module.weight.normal_(0.0, std)
        elif isinstance(module, (VWNRMSNorm, nn.GroupNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif hasattr(module, "read") and hasattr(module, "write"):  # a width connection
            module.reset_parameters()


def _attention_mask(attention_mask, q_len: int, past: int, device):
    """Boolean ``[b, 1, q, kv]`` mask (causal and padding), or None where SDPA's own causal
    flag (fresh sequence) or no mask (one new token) is exact."""
    kv_len = past + q_len
    if attention_mask is None or bool(attention_mask[:, :kv_len].all()):
        if q_len == 1 or past == 0:
            return None
        attention_mask = None
    query_pos = past + torch.arange(q_len, device=device)[:, None]
    key_pos = torch.arange(kv_len, device=device)[None, :]
    mask = key_pos <= query_pos  # [q, kv]
    if attention_mask is None:
        return mask[None, None]
    keys = attention_mask[:, None, None, :kv_len].bool()
    # A padded query sees only itself (its output is ignored; avoids all-masked rows).
    return mask[None, None] & (keys | (key_pos == query_pos)[None, None])


class VWNModel(VWNPreTrainedModel):
    """Embedding, decoder layers and the output norm; returns ``[b, s, D]`` and the wide state."""

    def __init__(self, config: VWNConfig):
        super().__init__(config)
        self.embedding = VWNEmbedding(config)
        active = config.altup_active or [0] * config.num_hidden_layers
        self.layers = nn.ModuleList(
            [VWNDecoderLayer(config, i, active[i]) for i in range(config.num_hidden_layers)])
        self.output_norm = VWNOutputNorm(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.embed_tokens

    def set_input_embeddings(self, value):
        self.embedding.embed_tokens = value

    def positions(self, input_ids, attention_mask, position_ids, past: int):
        if position_ids is not None:
            return position_ids
        b, s = input_ids.shape[:2]
        if attention_mask is not None:  # left padding: count real tokens
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            return positions[:, past:past + s]
        return (past + torch.arange(s, device=input_ids.device)).unsqueeze(0).expand(b, -1)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, past_key_values=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        b, s = inputs_embeds.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = _cache_argument(cache, past_key_values)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        cache = cache if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        ids = input_ids if input_ids is not None else torch.zeros(
            b, s, dtype=torch.long, device=inputs_embeds.device)
        positions = self.positions(ids, attention_mask, position_ids, past)
        cos, sin = rotary_cos_sin(self.config, positions, inputs_embeds.dtype)
        mask = _attention_mask(attention_mask, s, past, inputs_embeds.device)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, mask, cache)
        return VWNModelOutput(last_hidden_state=self.output_norm(hidden),
                              wide_hidden_state=hidden, **{CACHE_KEY: cache})


class VWNMTPLayer(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 style, VWN Sec. 3.4).

    ``e = E-norm(embedding of the tokens shifted by k)``, ``h = H-norm(previous depth's state)``;
    VWN: one ``Linear(2 d_b -> d_b)`` on ``[e_i ; h_i]`` of every segment; backbone (``none``):
    ``Linear(2D -> D)`` on ``[e ; h]``. Then one decoder layer and the output norm.
    """

    def __init__(self, config: VWNConfig, layer_idx: int, active: int = 0):
        super().__init__()
        width = config.wide_size
        self.wide = config.has_width
        self.n, self.d_b = config.vwn_n, config.segment_width
        self.enorm = VWNRMSNorm(width, config.rms_norm_eps)
        self.hnorm = VWNRMSNorm(width, config.rms_norm_eps)
        if self.wide:
            self.eh_proj = nn.Linear(2 * self.d_b, self.d_b, bias=False)
        else:
            self.eh_proj = nn.Linear(2 * width, width, bias=False)
        self.layer = VWNDecoderLayer(config, layer_idx, active)
        self.output_norm = VWNOutputNorm(config)

    def forward(self, previous, embedded, cos, sin, mask):
        e, h = self.enorm(embedded), self.hnorm(previous)
        if self.wide:
            b, s, width = h.shape
            pairs = torch.cat([e.reshape(b, s, self.n, self.d_b),
                               h.reshape(b, s, self.n, self.d_b)], dim=-1)
            x = self.eh_proj(pairs).reshape(b, s, width)
        else:
            x = self.eh_proj(torch.cat([e, h], dim=-1))
        x = self.layer(x, cos, sin, mask, None)
        return x, self.output_norm(x)


class VWNForCausalLM(VWNPreTrainedModel, GenerationMixin):
    """Causal LM head over :class:`VWNModel`; ``generate()`` with a KV cache.

    The multi-token-prediction heads (``mtp``) are loaded but unused by ``forward``; call
    :meth:`mtp_logits` for their next-N predictions (e.g. for speculative decoding).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embedding.embed_tokens.weight"}

    def __init__(self, config: VWNConfig):
        super().__init__(config)
        self.model = VWNModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        active = config.altup_mtp_active or [0] * config.num_mtp_layers
        self.mtp = nn.ModuleList(
            [VWNMTPLayer(config, config.num_hidden_layers + k, active[k])
             for k in range(config.num_mtp_layers)])
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embedding.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embedding.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                past_key_values=None, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=_cache_argument(cache, past_key_values),
                         inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{CACHE_KEY: getattr(out, CACHE_KEY)})

    def mtp_logits(self, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Next-N logits of the multi-token-prediction heads, one ``[b, s, V]`` per depth.

        Depth ``k`` (list index ``k - 1``) at position ``t`` predicts token ``t + 1 + k`` (the
        main head predicts ``t + 1``). As in training, depth ``k`` embeds the input shifted left
        by ``k`` (id 0 fills the end), so its last ``k`` positions have no real input. No cache;
        use unpadded (or right-padded) input.
        """
        if not len(self.mtp):
            raise ValueError("this model has no multi-token-prediction heads (num_mtp_layers=0)")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        wide = self.config.has_width
        previous = out.wide_hidden_state if wide else out.last_hidden_state
        b, s = input_ids.shape
        positions = self.model.positions(input_ids, attention_mask, None, 0)
        cos, sin = rotary_cos_sin(self.config, positions, previous.dtype)
        mask = _attention_mask(attention_mask, s, 0, input_ids.device)
        shifted = input_ids
        logits = []
        for layer in self.mtp:
            shifted = torch.roll(shifted, -1, dims=-1)
            shifted[:, -1] = 0
            state, normed = layer(previous, self.model.embedding(shifted), cos, sin, mask)
            logits.append(self.lm_head(normed))
            previous = state if wide else normed
        return logits


__all__ = ["VWNForCausalLM", "VWNModel", "VWNPreTrainedModel"]
