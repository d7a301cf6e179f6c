"""``model.vwn.recompute=ghc`` under TP=2+SP and PP=2 gives the single-process losses and
gradients of the default mode (the rebuild recipes stay on their rank; the final norm keeps its
gathered input under SP)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.test_parity import LAYOUTS, _run

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
