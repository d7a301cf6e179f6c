"""Parameter and FLOP counts from the config alone (no model needed), unit-tested against the
built model. Used for the start-of-run summary and tokens/s -> model FLOPs/s."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_vwn.config.schema import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    """Input token table plus an untied output layer."""
    backbone: int
    """Transformer layers and the final norm."""
    other: int = 0
    """Everything else (virtual-width and MTP extras when they land)."""

    @property
    def total(self) -> int:
        return self.embedding + self.backbone + self.other


def layer_params(model: ModelConfig) -> int:
    """One Llama-style layer: QKV + output projection, SwiGLU MLP, two RMSNorm gains."""
    d = model.hidden_size
    head_dim = d // model.num_attention_heads
    qkv = d * head_dim * (model.num_attention_heads + 2 * model.query_groups)
    proj = model.num_attention_heads * head_dim * d
    mlp = 3 * d * model.ffn_size
    return qkv + proj + mlp + 2 * d


def count_params(model: ModelConfig, vocab_size: int) -> ParamCounts:
    d = model.hidden_size
    embedding = vocab_size * d * (1 if model.tie_embeddings else 2)
    backbone = model.num_layers * layer_params(model) + d
    return ParamCounts(embedding=embedding, backbone=backbone)


def flops_per_token(model: ModelConfig, vocab_size: int) -> int:
    """Training FLOPs per token (forward + backward = 3 x forward).

    Forward: 2 FLOPs per weight of every matrix multiply (layers and LM head, not the table
    lookup) plus attention's two ``s x s`` products, ``2 * 2 * s * D`` per layer (no causal
    discount, as in Megatron-LM's reported throughput).
    """
    d = model.hidden_size
    matmul_weights = model.num_layers * (layer_params(model) - 2 * d) + vocab_size * d
    attention = model.num_layers * 4 * model.seq_length * d
    return 3 * (2 * matmul_weights + attention)


def format_summary(counts: ParamCounts, flops: int) -> str:
    def m(x: int) -> str:
        return f"{x / 1e6:.2f}M"

    return (
        f"parameters: total {m(counts.total)} | embedding {m(counts.embedding)} | "
        f"backbone {m(counts.backbone)} | other {m(counts.other)} | "
        f"training FLOPs/token {flops / 1e6:.2f}M"
    )
