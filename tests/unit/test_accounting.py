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


@pytest.mark.parametrize("vwn", [[], ["model.vwn.m=2", "model.vwn.n=4"]])
def test_mtp_hand_count(vwn):
    """One MTP depth adds a layer, the [e ; h] mixer, (VWN) its GHC pair and reduce, and a head
    pass; two depths add twice that."""
    from megatron_vwn.model.accounting import (
        layer_connection_flops_per_token,
        mtp_flops_per_token,
    )

    d, v, per_layer = 64, 320, layer_params(load_config(None, SHAPE).model)
    layer = 2 * (per_layer - 2 * d) + 4 * 16 * d
    without = load_config(None, [*SHAPE, *vwn])
    for depths in (1, 2):
        cfg = load_config(None, [*SHAPE, *vwn, f"model.mtp.num_layers={depths}"])
        if vwn:  # m=2, n=4: d_b = 32, D' = 128
            mixer = 4 * 32 * 128 + layer_connection_flops_per_token(cfg.model.vwn, d)
            mixer += 2 * 128 * d
        else:
            mixer = 4 * d * d
        expected = 3 * depths * (layer + 2 * v * d + mixer)
        assert mtp_flops_per_token(cfg.model, v) == expected
        assert flops_per_token(cfg.model, v) == flops_per_token(without.model, v) + expected
