"""The key maps: megatron-vwn's ``GPTModel`` names -> ``LlamaForCausalLM``,
``MixtralForCausalLM`` and ``VWNForCausalLM``.

Megatron names are those of the single-process model on the local spec (checkpoints store the
same tensors under Transformer Engine names; loading through :mod:`.megatron_io` resolves that).
The full table, with shapes, is in docs/convert.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_vwn.compat.mcore import MTP_INNER_LAYER
from megatron_vwn.config.schema import ModelConfig
from megatron_vwn.convert.keymap import FusedGateUp, FusedQKV, Rule, Same, VocabRows
from megatron_vwn.model.width.registry import members


@dataclass(frozen=True)
class MapShape:
    """What the transforms need: attention layout and the vocabulary with and without padding."""

    heads: int
    groups: int
    head_dim: int
    vocab: int
    padded_vocab: int

    @classmethod
    def of(cls, model: ModelConfig, vocab: int, padded_vocab: int) -> MapShape:
        return cls(heads=model.num_attention_heads, groups=model.query_groups,
                   head_dim=model.hidden_size // model.num_attention_heads, vocab=vocab,
                   padded_vocab=padded_vocab)


def mixtral_moe_rules(megatron: str, hf: str) -> list[Rule]:
    """Megatron-Core's ``MoELayer`` (``SequentialMLP`` experts) <-> Mixtral's sparse MoE block
    in its published layout (router ``gate``, expert ``{e}``: ``w1`` gate, ``w3`` up, ``w2``
    down; transformers 5 fuses the experts on load)."""
    experts = f"{megatron}mlp.experts.local_experts.{{e}}."
    shared = f"{hf}block_sparse_moe.shared_expert."
    return [
        Rule(f"{megatron}mlp.router.weight", (f"{hf}block_sparse_moe.gate.weight",)),
        # beyond Mixtral (VWNForCausalLM only): DeepSeek-V3's expert bias, the shared expert
        Rule(f"{megatron}mlp.router.expert_bias", (f"{hf}block_sparse_moe.gate.expert_bias",)),
        Rule(f"{megatron}mlp.shared_experts.linear_fc1.weight",
             (f"{shared}gate_proj.weight", f"{shared}up_proj.weight"), FusedGateUp()),
        Rule(f"{megatron}mlp.shared_experts.linear_fc2.weight", (f"{shared}down_proj.weight",)),
        Rule(f"{experts}linear_fc1.weight", (f"{hf}block_sparse_moe.experts.{{e}}.w1.weight",
                                             f"{hf}block_sparse_moe.experts.{{e}}.w3.weight"),
             FusedGateUp()),
        Rule(f"{experts}linear_fc2.weight", (f"{hf}block_sparse_moe.experts.{{e}}.w2.weight",)),
    ]


def layer_rules(megatron: str, hf: str, shape: MapShape, ghc: bool) -> list[Rule]:
    """One transformer layer: ``megatron`` and ``hf`` are the layer prefixes (with ``.``); its
    MLP dense (Llama names) or MoE (Mixtral names), whichever the model holds."""
    qkv = FusedQKV(shape.heads, shape.groups, shape.head_dim)
    rules = [
        Rule(f"{megatron}input_layernorm.weight", (f"{hf}input_layernorm.weight",)),
        Rule(f"{megatron}self_attention.linear_qkv.weight",
             (f"{hf}self_attn.q_proj.weight", f"{hf}self_attn.k_proj.weight",
              f"{hf}self_attn.v_proj.weight"), qkv),
        Rule(f"{megatron}self_attention.linear_proj.weight", (f"{hf}self_attn.o_proj.weight",)),
        Rule(f"{megatron}pre_mlp_layernorm.weight", (f"{hf}post_attention_layernorm.weight",)),
        Rule(f"{megatron}mlp.linear_fc1.weight",
             (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"), FusedGateUp()),
        Rule(f"{megatron}mlp.linear_fc2.weight", (f"{hf}mlp.down_proj.weight",)),
        *mixtral_moe_rules(megatron, hf),
    ]
    if ghc:
        rules += width_rules(megatron, hf)
    return rules


def width_rules(megatron: str, hf: str) -> list[Rule]:
    """Every registered member's connection parameters, slot by slot (members sharing a slot
    share its rules: GHC, HC, Frac and mHC)."""
    names: dict[tuple[str, str], None] = {}
    for member in members():
        for ours, theirs in member.hf_slots().items():
            names.update({(f"{ours}.{p}", f"{theirs}.{p}"): None for p in member.hf_params})
    return [Rule(f"{megatron}{ours}", (f"{hf}{theirs}",)) for ours, theirs in names]


def output_norm_rules(megatron: str, hf: str) -> list[Rule]:
    """The final norm: plain RMSNorm (backbone) or VWN's GroupNorm + reduce + RMSNorm."""
    return [
        Rule(f"{megatron}weight", (f"{hf}norm.weight",)),  # backbone: the RMSNorm itself
        Rule(f"{megatron}norm.weight", (f"{hf}norm.weight",)),
        Rule(f"{megatron}group_norm.weight", (f"{hf}group_norm.weight",)),
        Rule(f"{megatron}group_norm.bias", (f"{hf}group_norm.bias",)),
        Rule(f"{megatron}reduce.weight", (f"{hf}reduce.weight",)),
        Rule(f"{megatron}altup_unembed_projections", (f"{hf}altup_unembed_projections",)),
    ]


def mtp_rules(shape: MapShape) -> list[Rule]:
    """Multi-token-prediction depths -> ``mtp.{k}.*`` (the names of ``VWNForCausalLM.mtp``)."""
    return [
        Rule("mtp.layers.{k}.enorm.weight", ("mtp.{k}.enorm.weight",)),
        Rule("mtp.layers.{k}.hnorm.weight", ("mtp.{k}.hnorm.weight",)),
        Rule("mtp.layers.{k}.eh_proj.weight", ("mtp.{k}.eh_proj.weight",)),
        *layer_rules(f"mtp.layers.{{k}}.{MTP_INNER_LAYER}.", "mtp.{k}.layer.", shape, ghc=True),
        *output_norm_rules("mtp.layers.{k}.final_layernorm.", "mtp.{k}.output_norm."),
    ]


def llama_rules(shape: MapShape) -> list[Rule]:
    """Backbone -> ``LlamaForCausalLM``, or ``MixtralForCausalLM`` for a plain MoE backbone
    (the same names, each MLP as Mixtral's sparse MoE block; MTP depths -> ``mtp.{k}.*``, stored
    beside it)."""
    vocab = VocabRows(shape.vocab, shape.padded_vocab)
    return [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab),
        *layer_rules("decoder.layers.{i}.", "model.layers.{i}.", shape, ghc=False),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",), Same()),
        Rule("output_layer.weight", ("lm_head.weight",), vocab),
        *mtp_rules(shape),
    ]


def vwn_rules(shape: MapShape) -> list[Rule]:
    """VWN / HC / Frac / mHC / AltUp models (and the backbone as ``vwn_connection=none``) ->
    ``VWNForCausalLM``."""
    vocab = VocabRows(shape.vocab, shape.padded_vocab)
    return [
        Rule("embedding.word_embeddings.weight", ("model.embedding.embed_tokens.weight",), vocab),
        Rule("embedding.expand", ("model.embedding.expand.weight",)),
        Rule("embedding.altup_projections", ("model.embedding.altup_projections",)),
        *layer_rules("decoder.layers.{i}.", "model.layers.{i}.", shape, ghc=True),
        *output_norm_rules("decoder.final_layernorm.", "model.output_norm."),
        Rule("output_layer.weight", ("lm_head.weight",), vocab),
        *mtp_rules(shape),
    ]
