"""Parameter and FLOP counts from the config alone (no model needed), unit-tested against the
built model. Used for the start-of-run summary and tokens/s -> model FLOPs/s."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_vwn.config.schema import ModelConfig, VwnConfig


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    """Input token table plus an untied output layer."""
    backbone: int
    """Transformer layers and the final norm."""
    other: int = 0
    """Everything else: virtual-width extras (GHC modules, W_expand, GroupNorm, W_reduce)."""
    inactive: int = 0
    """Routed-expert parameters one token does not use: ``num_experts - top_k`` experts of
    every MoE layer (0 for a dense model)."""

    @property
    def total(self) -> int:
        return self.embedding + self.backbone + self.other

    @property
    def active(self) -> int:
        """Parameters one token uses (the total of a dense model)."""
        return self.total - self.inactive


def layer_params(model: ModelConfig, moe_layer: bool = False, active: bool = False) -> int:
    """One Llama-style layer: QKV + output projection, SwiGLU MLP, two RMSNorm gains.

    ``moe_layer``: the MLP is an MoE layer (docs/moe.md): router ``E D``, ``E`` SwiGLU experts
    of width ``F_e`` and the shared expert (width ``F_s``), ``3 D (E F_e + F_s)``; ``active``
    counts the ``top_k`` experts one token uses instead of all ``E``."""
    d = model.hidden_size
    head_dim = d // model.num_attention_heads
    qkv = d * head_dim * (model.num_attention_heads + 2 * model.query_groups)
    proj = model.num_attention_heads * head_dim * d
    mlp = 3 * d * model.ffn_size
    if moe_layer:
        moe = model.moe
        experts = moe.top_k if active else moe.num_experts
        width = experts * moe.expert_ffn_size(model.ffn_size) + moe.shared_expert_ffn_hidden_size
        mlp = moe.num_experts * d + 3 * d * width
    return qkv + proj + mlp + 2 * d


def moe_layer_count(model: ModelConfig) -> int:
    """Decoder layers whose MLP is MoE (all but the first ``model.moe.dense_layers``)."""
    return model.num_layers - model.moe.dense_layers if model.moe.enabled else 0


def connection_params_per_layer(vwn: VwnConfig, hidden_size: int) -> int:
    """The width-connection parameters of one layer (the member's count)."""
    return vwn.member.layer_params(vwn, hidden_size)


def reduce_params(vwn: VwnConfig, hidden_size: int) -> int:
    """The exit's ``W_reduce`` and GroupNorm (``vwn_io.py``; 0 for the other exits)."""
    if vwn.resolved_reduce != "ghc":
        return 0
    wide = virtual_width(vwn, hidden_size)
    return wide * hidden_size + (2 * wide if vwn.use_group_norm else 0)


def virtual_width(vwn: VwnConfig, hidden_size: int) -> int:
    return vwn.n * (hidden_size // vwn.m)


def count_params(model: ModelConfig, vocab_size: int) -> ParamCounts:
    d, vwn = model.hidden_size, model.vwn
    table = d
    other = 0
    if vwn.enabled:
        wide = virtual_width(vwn, d)
        other = model.num_layers * connection_params_per_layer(vwn, d)
        embedding = vwn.resolved_embedding
        if embedding == "wide":
            table = wide
        elif embedding == "factorized":
            other += wide * d  # W_expand
        elif embedding == "projected":  # Gemma 3n: K-1 stream projections in, K-1 out
            other += 2 * (vwn.n - 1) * d * d
        other += reduce_params(vwn, d)
    embedding = vocab_size * table + (0 if model.tie_embeddings else vocab_size * d)
    moe_layers = moe_layer_count(model)
    backbone = ((model.num_layers - moe_layers) * layer_params(model)
                + moe_layers * layer_params(model, moe_layer=True) + d)
    inactive = moe_layers * (layer_params(model, moe_layer=True)
                             - layer_params(model, moe_layer=True, active=True))
    return ParamCounts(embedding=embedding, backbone=backbone, other=other, inactive=inactive)


def layer_connection_flops_per_token(vwn: VwnConfig, hidden_size: int) -> int:
    """Forward FLOPs of one layer's width connection per token (the member's count)."""
    return vwn.member.layer_flops(vwn, hidden_size)


def vwn_flops_per_token(model: ModelConfig) -> int:
    """Training FLOPs per token added by virtual width (connections, expand, reduce)."""
    vwn, d = model.vwn, model.hidden_size
    if not vwn.enabled:
        return 0
    forward = model.num_layers * layer_connection_flops_per_token(vwn, d)
    forward += _reduce_forward_flops(vwn, d) * (2 if vwn.resolved_embedding == "factorized" else 1)
    if vwn.resolved_embedding == "projected":
        forward += 2 * 2 * (vwn.n - 1) * d * d
    return 3 * forward


def _reduce_forward_flops(vwn: VwnConfig, hidden_size: int) -> int:
    """Forward FLOPs per token of GHC's ``W_reduce: D' -> D`` (0 when there is no reduce)."""
    wide = virtual_width(vwn, hidden_size)
    return 2 * wide * hidden_size if vwn.resolved_reduce == "ghc" else 0


def _layer_forward_flops(model: ModelConfig, moe_layer: bool = False) -> int:
    """Forward FLOPs per token of one transformer layer's matmuls and attention products (an
    MoE layer: the router and the ``top_k`` experts a token goes to, plus the shared expert)."""
    d = model.hidden_size
    weights = layer_params(model, moe_layer=moe_layer, active=True) - 2 * d
    return 2 * weights + 4 * model.seq_length * d


def mtp_flops_per_token(model: ModelConfig, vocab_size: int) -> int:
    """Training FLOPs per token of the multi-token-prediction heads (docs/mtp.md), per depth:
    the ``[e ; h]`` mixer (backbone ``eh_proj: 2D -> D``, ``4 D^2``; virtual width: the block
    linear ``2 d_b -> d_b`` on each of the ``n`` segments, ``4 d_b D'``), one transformer layer
    with its width connection, the GHC reduce ``2 D' D`` and the shared LM head ``2 V D``."""
    depths = model.mtp.num_layers
    if not depths:
        return 0
    vwn, d = model.vwn, model.hidden_size
    mixer = 4 * (d // vwn.m) * virtual_width(vwn, d)  # the backbone's m = n = 1: 4 D^2
    # Megatron-Core builds an MTP layer with the decoder's last layer spec: MoE on an MoE model.
    forward = _layer_forward_flops(model, moe_layer=model.moe.enabled) + 2 * vocab_size * d + mixer
    if vwn.enabled:
        forward += layer_connection_flops_per_token(vwn, d) + _reduce_forward_flops(vwn, d)
    return 3 * depths * forward


def flops_per_token(model: ModelConfig, vocab_size: int) -> int:
    """Training FLOPs per token (forward + backward = 3 x forward), MTP heads included.

    Forward: 2 FLOPs per weight of every matrix multiply (layers and LM head, not the table
    lookup) plus attention's two ``s x s`` products, ``2 * 2 * s * D`` per layer (no causal
    discount, as in Megatron-LM's reported throughput). MoE layers count the weights a token
    is routed through (active FLOPs: router, ``top_k`` experts, shared expert); with
    ``capacity_factor`` the dropped tokens' expert FLOPs are still counted.
    """
    moe_layers = moe_layer_count(model)
    forward = ((model.num_layers - moe_layers) * _layer_forward_flops(model)
               + moe_layers * _layer_forward_flops(model, moe_layer=True)
               + 2 * vocab_size * model.hidden_size)
    return 3 * forward + vwn_flops_per_token(model) + mtp_flops_per_token(model, vocab_size)


def format_summary(model: ModelConfig, vocab_size: int) -> str:
    """The start-of-run summary: parameter groups, FLOPs per token, and the VWN overhead."""
    counts = count_params(model, vocab_size)
    flops = flops_per_token(model, vocab_size)

    def m(x: int) -> str:
        return f"{x / 1e6:.2f}M"

    active = f" (active {m(counts.active)})" if counts.inactive else ""
    text = (
        f"parameters: total {m(counts.total)}{active} | embedding {m(counts.embedding)} | "
        f"backbone {m(counts.backbone)} | other {m(counts.other)} | "
        f"training FLOPs/token {flops / 1e6:.2f}M"
    )
    mtp = mtp_flops_per_token(model, vocab_size)
    if mtp:
        text += f" (MTP heads {m(mtp)} of it)"
    extra = vwn_flops_per_token(model)
    if extra:
        vwn = model.vwn
        text += (
            f" | virtual width {vwn.connection} (m={vwn.m}, n={vwn.n}, r={vwn.n / vwn.m:g}, "
            f"D'={virtual_width(vwn, model.hidden_size)}): +{m(counts.other)} parameters, "
            f"+{extra / 1e6:.2f}M FLOPs/token ({100 * extra / (flops - extra - mtp):.1f}% of "
            f"the backbone's)"
        )
    return text
