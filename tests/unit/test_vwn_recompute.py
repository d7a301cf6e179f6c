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

import gc
import weakref

import pytest
import torch

from megatron_vwn.config import load_config
from megatron_vwn.model.builder import build_model
from megatron_vwn.model.width.ghc import GHC, vwn_init
from megatron_vwn.model.width.ghc_recompute import RecomputeChain

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
            for ghc in (getattr(layer, "attention_connection", None),
                        getattr(layer, "mlp_connection", None)):
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


# ------------------------------------------------------------------ the chain a model chunk owns
M, N, D_B, TOKENS = 2, 4, 8, 5


def _linked_pair(mode: str):
    """Two dynamic GHC modules (non-trivial projections) sharing one chain, as in a chunk."""
    torch.manual_seed(3)
    chain = RecomputeChain()
    pair = [GHC(M, N, D_B, vwn_init(M, N, D_B), recompute=mode, dtype=torch.float64)
            for _ in range(2)]
    for ghc in pair:
        ghc.recompute_chain = chain
        with torch.no_grad():
            ghc.proj.normal_(0, 0.5)
    return pair, chain


def _first_write(first):
    hidden = torch.randn(TOKENS, 1, N * D_B, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0)).requires_grad_()
    x, saved = first.read(hidden)
    return hidden, first.write(torch.tanh(x), saved)


def test_the_chain_knows_a_write_by_identity_and_lets_it_go():
    (first, _), chain = _linked_pair("ghc")
    _, out = _first_write(first)
    assert vars(out) == {}  # no recipe rides on the tensor
    source = chain.source_of(out)
    assert source is not None
    aliases = [out.view(out.shape), out.detach(), out[:],
               torch.empty(0, dtype=out.dtype).set_(out.detach())]
    for alias in aliases:  # same storage, same address, another tensor: no recipe
        assert alias.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
        assert chain.source_of(alias) is None
    assert chain.source_of(out.clone()) is None
    kept = weakref.ref(source)
    del source, out, aliases
    gc.collect()
    assert kept() is None  # the recipe lived only as long as the output


def test_a_tensor_sharing_the_written_storage_is_read_as_itself():
    """The second module reads a tensor on the first write's storage whose values changed in
    place since: the recipe (the values before) must not stand for it. A chain keyed by storage
    address would rebuild the old values in backward and give other gradients."""
    results = {}
    for mode in ("none", "ghc"):
        (first, second), _ = _linked_pair(mode)
        hidden, out = _first_write(first)
        alias = out.detach()
        alias.mul_(2.0)  # same storage as `out`, other values
        alias.requires_grad_()
        x, saved = second.read(alias)
        second.write(torch.tanh(x), saved).square().sum().backward()
        results[mode] = [alias.grad, *(p.grad for p in second.parameters())]
    for got, truth in zip(results["ghc"], results["none"], strict=True):
        # fp64: the modes differ only in the order autograd sums the same terms
        torch.testing.assert_close(got, truth, rtol=1e-12, atol=1e-12)


def test_micro_batches_in_flight_keep_their_own_recipes(single_process):
    """Pipeline schedules run several forwards before their backwards: each micro-batch's
    reads find its own writes. Interleaved (F0 F1 B1 B0) equals one at a time (F0 B0 F1 B1)
    exactly: each parameter's gradient is the same two sums added in the other order."""
    g = torch.Generator().manual_seed(1)
    batches = [_batch(), (torch.randint(0, VOCAB, (1, SEQ), generator=g), _batch()[1])]
    grads = {}
    for order in ("interleaved", "sequential"):
        model = _model(*WIDE_8X, "model.vwn.recompute=ghc")

        def loss(tokens, positions, model=model):
            return model(tokens, positions, None, labels=tokens).float().mean()

        if order == "interleaved":
            losses = [loss(*batch) for batch in batches]
            for value in reversed(losses):
                value.backward()
        else:
            for batch in batches:
                loss(*batch).backward()
        grads[order] = {n: p.grad for n, p in model.named_parameters()}
    for name, grad in grads["sequential"].items():
        assert torch.equal(grads["interleaved"][name], grad), name
