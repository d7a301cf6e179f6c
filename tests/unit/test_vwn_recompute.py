"""``model.vwn.recompute``: every mode gives the same gradients, and ``ghc`` keeps the wide
state once per layer, meeting the activation bound (<= 1.35x the backbone's at 8x (8,64)).

Saved bytes are counted exactly as ``scripts/bench_vwn.py`` counts them: unique storages packed
by autograd's saved-tensor hooks during one forward (parameters a layer saves included). The
shape keeps the bench's proportions at D = 1024 scaled down by 8 (tokens = D / 4, vocabulary =
D, heads of 128, FFN 2.69 D, two layers) and the 8x factor r = 8, as (2,16): with (8,64) at
D = 128 the segments would be 16 wide and the per-segment terms (coefficients, norm statistics)
weigh five times what they do at D = 1024; at (2,16), d_b = 64 keeps them near it. Measured
here: none 1.72, coefficients 1.60, ghc 1.34 (bench at D = 1024, (8,64): 1.93 / 1.67 / 1.34).
"""

from __future__ import annotations

import pytest
import torch

from megatron_vwn.config import load_config
from megatron_vwn.model.builder import build_model

D, SEQ, VOCAB = 128, 32, 128
SHAPE = ["model.num_layers=2", f"model.hidden_size={D}", "model.num_attention_heads=1",
         "model.num_query_groups=1", "model.ffn_hidden_size=344", f"model.seq_length={SEQ}"]
WIDE_8X = ["model.vwn.m=2", "model.vwn.n=16"]


def _model(*overrides):
    torch.manual_seed(0)
    (model,) = build_model(load_config(None, [*SHAPE, *overrides]), VOCAB)
    torch.manual_seed(7)
    with torch.no_grad():  # a non-trivial dynamic path
        for layer in getattr(model.decoder, "layers", []):
            for ghc in (getattr(layer, "attention_ghc", None), getattr(layer, "mlp_ghc", None)):
                if ghc is not None:
                    ghc.proj.normal_(0, 0.5)
    return model


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=g)
    return tokens, torch.arange(SEQ).unsqueeze(0)


def _saved(model) -> tuple[int, list[int], dict]:
    """Saved bytes in one forward (unique storages), their sizes, and the gradients."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    tokens, positions = _batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return sum(seen.values()), list(seen.values()), grads


def test_recompute_modes_agree_and_ghc_keeps_the_state_once_per_layer(single_process):
    base, _, _ = _saved(_model())
    results = {mode: _saved(_model(*WIDE_8X, f"model.vwn.recompute={mode}"))
               for mode in ("none", "coefficients", "ghc")}
    alias = _saved(_model(*WIDE_8X, "model.vwn.recompute_coefficients=true"))
    assert alias[0] == results["coefficients"][0]
    for mode in ("coefficients", "ghc"):
        for name, grad in results["none"][2].items():
            torch.testing.assert_close(results[mode][2][name], grad, rtol=1e-5, atol=1e-6,
                                       msg=f"{mode}: {name}")
    ratios = {mode: total / base for mode, (total, _, _) in results.items()}
    assert ratios["ghc"] < ratios["coefficients"] < ratios["none"]
    assert ratios["ghc"] <= 1.35, ratios
    # Once per layer: the wide state [SEQ, D'] fp32 appears exactly num_layers times.
    wide = SEQ * 16 * (D // 2) * 4
    assert results["ghc"][1].count(wide) == 2
    assert results["none"][1].count(wide) > 2


@pytest.mark.parametrize("extra", [["model.vwn.connection=hc", "model.vwn.m=1", "model.vwn.n=4"],
                                   ["model.vwn.m=2", "model.vwn.n=3"],
                                   ["model.vwn.m=2", "model.vwn.n=8", "model.mtp.num_layers=1"]])
def test_ghc_recompute_gradients_for_hc_without_group_norm_and_with_mtp(single_process, extra):
    ref = _saved(_model(*extra))
    got = _saved(_model(*extra, "model.vwn.recompute=ghc"))
    assert got[0] < ref[0]
    for name, grad in ref[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-5, atol=1e-6, msg=name)
