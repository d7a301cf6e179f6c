"""``model.vwn.recompute=ghc`` under TP=2+SP and PP=2 gives the single-process losses and
gradients of the default mode (the rebuild recipes stay on their rank; the final norm keeps its
gathered input under SP)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launcher import run_batch
from tests.distributed.test_parity import BASE, LAYOUTS, WORKER, _run, results_of

VWN = ["model.vwn.m=2", "model.vwn.n=4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    return _run(tmp_path_factory.mktemp("ref-ghc"), data_cache, 1, VWN)


@pytest.mark.parametrize("layout", ["tp2_sp", "pp2"])
def test_ghc_recompute_matches_the_default_mode(layout, reference, tmp_path, data_cache):
    nproc, overrides = LAYOUTS[layout]
    ref_losses, _, ref_norms, ref_grads = reference
    losses, _, norms, grads = _run(tmp_path, data_cache, nproc,
                                   [*VWN, "model.vwn.recompute=ghc", *overrides])
    assert ref_losses[-1] < ref_losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-4, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        scale = ref.abs().max().item()
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------- train.recompute (Megatron-Core)
# Activation recompute changes what is kept for backward, not what is computed: a recomputed
# forward runs the same operations on the same inputs with the same RNG states (dropout masks
# included), so losses and gradients equal the run without recompute at the same layout. Every
# case of a world size runs in one launch (parity_worker.py --batch); each model's reference is
# the same model without recompute in that launch.
MODELS = {
    "backbone": [],
    "vwn8x": ["model.vwn.m=8", "model.vwn.n=64"],
    "mhc4": ["model.vwn.connection=mhc", "model.vwn.n=4"],
    "altup2": ["model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.dynamic=false"],
    "dropout": ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"],
    # MTP heads are recomputed by Megatron-Core's MTP block (uniform, one layer per unit)
    "vwn_mtp1": ["model.vwn.m=2", "model.vwn.n=4", "model.mtp.num_layers=1",
                 "model.mtp.loss_weight=0.3"],
}
MODES = {
    "selective": ["train.recompute=selective", "train.recompute_modules=[core_attn,mlp]"],
    "full_uniform": ["train.recompute=full"],
    "full_block": ["train.recompute=full", "train.recompute_method=block",
                   "train.recompute_num_layers=1"],  # 1 of the 2 layers of a PP=2 stage
}
PAIRS = {"backbone": list(MODES), "vwn8x": ["selective", "full_uniform"],
         "mhc4": ["full_uniform"], "altup2": ["full_block"],
         "dropout": ["selective", "full_uniform"], "vwn_mtp1": ["full_uniform"]}
RECOMPUTE_LAYOUTS = ["tp2_sp", "pp2"]  # both world size 2: one launch each
CASES = [(layout, model, mode) for layout in RECOMPUTE_LAYOUTS for model, modes in PAIRS.items()
         for mode in modes]


@pytest.fixture(scope="module")
def recompute_runs(tmp_path_factory, data_cache):
    """``runs(layout)``: {case name: (losses, MTP losses, grad norms, grads)} of one batched
    launch."""
    results = {}

    def get(layout: str):
        if layout not in results:
            nproc, overrides = LAYOUTS[layout]
            root = tmp_path_factory.mktemp(f"recompute-{layout}")
            cases = {model: MODELS[model] for model in PAIRS}
            cases.update({f"{model}-{mode}": [*MODELS[model], *MODES[mode]]
                          for model, modes in PAIRS.items() for mode in modes})
            base = [*BASE, "train.iters=2", f"data.cache_dir={data_cache}", *overrides]
            ranks = run_batch(WORKER, root, nproc, base, cases, timeout=600)
            results[layout] = {name: results_of(ranks[name]) for name in cases}
        return results[layout]

    return get


# What may differ: autograd can accumulate the gradient of a tensor used at several places (a
# wide state read by several connections, a weight shared by micro-batches) in another order
# when the forward is replayed inside backward. Each such sum has at most K = 64 contributions
# here (4 layers x 2 sublayers x up to 8 reads or micro-batches), so it moves by at most K * u
# (u = 2**-24, fp32 unit roundoff) times the largest magnitude involved; the tensor's largest
# gradient (for gradients) or the value itself (losses, norms) stands for it.
RECOMPUTE_RTOL = 64 * 2.0**-24


@pytest.mark.parametrize("layout, model, mode", CASES)
def test_activation_recompute_changes_no_gradient(layout, model, mode, recompute_runs):
    runs = recompute_runs(layout)
    ref_losses, _, ref_norms, ref_grads = runs[model]
    losses, _, norms, grads = runs[f"{model}-{mode}"]
    assert grads.keys() == ref_grads.keys()
    assert losses[0] == ref_losses[0]  # the first forward is the same computation
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses),
                               rtol=RECOMPUTE_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms),
                               rtol=RECOMPUTE_RTOL, atol=0)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=0,
                                   atol=RECOMPUTE_RTOL * ref.abs().max().item(),
                                   msg=lambda m, n=name: f"{n}: {m}")
