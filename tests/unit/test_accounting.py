"""Parameter and FLOP counts from the config agree with the built model and with a hand count."""

from __future__ import annotations

import pytest

from megatron_vwn.config import load_config
from megatron_vwn.model.accounting import count_params, flops_per_token, layer_params

SHAPE = ["model.num_layers=3", "model.hidden_size=64", "model.num_attention_heads=8",
         "model.num_query_groups=2", "model.ffn_hidden_size=160", "model.seq_length=16"]


@pytest.mark.parametrize("tied", [False, True])
def test_counts_match_built_model(single_process, tied):
    from megatron_vwn.model.builder import build_model

    cfg = load_config(None, [*SHAPE, f"model.tie_embeddings={str(tied).lower()}"])
    (model,) = build_model(cfg, vocab_size=320)
    built = {"embedding": 0, "backbone": 0}
    for name, param in model.named_parameters():
        group = "embedding" if name.startswith(("embedding", "output_layer")) else "backbone"
        built[group] += param.numel()
    counts = count_params(cfg.model, 320)
    assert counts.embedding == built["embedding"]
    assert counts.backbone == built["backbone"]
    assert counts.other == 0


def test_hand_count():
    cfg = load_config(None, SHAPE)
    d, head_dim, heads, groups, ffn = 64, 8, 8, 2, 160
    qkv = d * head_dim * (heads + 2 * groups)
    per_layer = qkv + heads * head_dim * d + 3 * d * ffn + 2 * d
    assert layer_params(cfg.model) == per_layer
    forward = 2 * (3 * (per_layer - 2 * d) + 320 * d) + 3 * 4 * 16 * d
    assert flops_per_token(cfg.model, 320) == 3 * forward
