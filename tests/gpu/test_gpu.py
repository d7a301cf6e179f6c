"""On a CUDA device: the compiled Triton GHC kernels against fp64 truth (bf16 and fp64),
Transformer Engine against the local spec, bf16 against fp32 training loss.

Every test is ``gpu``-marked and skips without CUDA (``conftest.py``); the check part of
``scripts/gpu_check.py`` runs them on a device machine, the bf16 kernel cases (``-k "triton and
bf16"``) as one step and the rest as the next. Shapes are few, so Triton compiles few kernel
variants.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from megatron_vwn.model.width.ghc import GHC, hc_init, vwn_init

pytestmark = pytest.mark.gpu


def _ghc(m, n, d_b, dtype):
    torch.manual_seed(0)
    init = hc_init(n, 1) if m == 1 else vwn_init(m, n, d_b)
    ghc = GHC(m, n, d_b, init, device="cuda")
    with torch.no_grad():
        for p in ghc.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return ghc.to(dtype)


def _run(ghc, kernel, hidden, z, grads):
    ghc.kernel = kernel
    hidden = hidden.detach().clone().requires_grad_(True)
    z = z.detach().clone().requires_grad_(True)
    x, saved = ghc.read(hidden)
    out = ghc.write(z, saved)
    torch.autograd.backward([x, out], list(grads))
    result = {"x": x, "out": out, "d hidden": hidden.grad, "d z": z.grad,
              **{k: p.grad.clone() for k, p in ghc.named_parameters()}}
    ghc.zero_grad(set_to_none=True)
    return result


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# Bounds against fp64 truth (the torch path in fp64 on the same rounded inputs), derived as in
# tests/unit/test_ghc_triton.py: fp64 kernels within 1e3 * K * u64 (K = tokens * d_b, the
# longest accumulation: 301 * 2048), bf16 state within 16 * u_bf16 (four stored roundings, 4x
# for cancellation) for each kernel. No fp32 comparison: at K = 6e5 its a-priori bound K * u32
# is vacuous and anything tighter would depend on the GPU's summation order.
_BOUNDS = {torch.float64: lambda k: 1e3 * k * torch.finfo(torch.float64).eps / 2,
           torch.bfloat16: lambda k: 16 * torch.finfo(torch.bfloat16).eps / 2}


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float64, id="fp64")])
@pytest.mark.parametrize("m,n,hidden_size", [(2, 3, 2048), (8, 16, 2048), (8, 64, 2048),
                                             (1, 4, 512)])
def test_triton_ghc_matches_torch(m, n, hidden_size, dtype):
    d_b = hidden_size // m
    ghc = _ghc(m, n, d_b, dtype)
    g = torch.Generator(device="cuda").manual_seed(1)
    tokens = 301  # odd: partial token blocks
    hidden = torch.randn(tokens, 1, n * d_b, generator=g, device="cuda").to(dtype)
    z = torch.randn(tokens, 1, m * d_b, generator=g, device="cuda").to(dtype)
    grads = (torch.randn_like(z), torch.randn_like(hidden))
    truth = _run(ghc.to(torch.float64), "torch", hidden.double(), z.double(),
                 tuple(t.double() for t in grads))
    ghc = ghc.to(dtype)
    bound = _BOUNDS[dtype](tokens * d_b)
    for kernel in ("torch", "triton") if dtype != torch.float64 else ("triton",):
        got = _run(ghc, kernel, hidden, z, grads)
        for key, expected in truth.items():
            assert got[key].dtype == dtype, key
            assert torch.isfinite(got[key]).all(), key
            assert _rel(got[key], expected) < bound, (kernel, key, _rel(got[key], expected))


def _loss(overrides, state=None):
    from megatron_vwn.config import load_config
    from megatron_vwn.model.builder import build_model

    shape = ["model.num_layers=2", "model.hidden_size=256", "model.num_attention_heads=4",
             "model.num_query_groups=2", "model.seq_length=64", "model.vwn.m=2",
             "model.vwn.n=4"]
    torch.manual_seed(0)
    (model,) = build_model(load_config(None, [*shape, *overrides]), 512)
    if state is not None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()},
                              strict=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, 512, (2, 64), generator=g, device="cuda")
    positions = torch.arange(64, device="cuda").unsqueeze(0).expand(2, -1)
    with torch.autocast("cuda", dtype=torch.bfloat16,
                        enabled="train.precision=bf16" in overrides):
        loss = model(tokens, positions, None, labels=tokens).float().mean()
    return loss.item(), {k: v.detach().float() for k, v in model.state_dict().items()
                         if isinstance(v, torch.Tensor)}


def test_bf16_loss_is_close_to_fp32(single_process):
    fp32, state = _loss(["train.precision=fp32", "model.transformer_impl=local"])
    bf16, _ = _loss(["train.precision=bf16", "model.transformer_impl=local"], state)
    assert abs(bf16 - fp32) < 2e-2 * abs(fp32), (bf16, fp32)


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                    reason="Transformer Engine not installed")
def test_transformer_engine_loss_matches_the_local_spec(single_process):
    """The TE spec names its parameters differently (fused norm + linear), so the two models
    start from different draws: their first losses must both sit at ln(V) like each other."""
    import math

    local, _ = _loss(["train.precision=bf16", "model.transformer_impl=local"])
    te, _ = _loss(["train.precision=bf16", "model.transformer_impl=transformer_engine"])
    assert abs(te - local) < 0.02 * local and abs(local - math.log(512)) < 0.05 * local


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None
                    or not torch.cuda.is_available()
                    or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs Transformer Engine and an Ada/Hopper/Blackwell GPU")
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_loss_is_close_to_bf16(single_process, recipe):
    """train.precision=fp8 builds and runs through Transformer Engine (docs/scale.md): from the
    same weights its first loss stays within FP8's error of bf16's (e4m3 keeps 3 mantissa bits,
    relative error 2**-4 per value, mostly averaging out in the loss)."""
    te = ["model.transformer_impl=transformer_engine"]
    bf16, state = _loss(["train.precision=bf16", *te])
    fp8, _ = _loss(["train.precision=fp8", f"train.fp8_recipe={recipe}", *te], state)
    assert math.isfinite(fp8) and abs(fp8 - bf16) < 2**-4 * abs(bf16), (fp8, bf16)
