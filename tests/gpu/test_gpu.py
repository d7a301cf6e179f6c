"""On a CUDA device: the compiled Triton GHC kernels against fp64 truth (bf16 and fp64),
Transformer Engine against the local spec and bf16/FP8 against fp32/bf16 logits from
the same weights.

Every test is ``gpu``-marked and skips without CUDA (``conftest.py``); the check part of
``scripts/gpu_check.py`` runs them on a device machine, the bf16 kernel cases (``-k "triton and
bf16"``) as one step and the rest as the next. Shapes are few, so Triton compiles few kernel
variants.
"""

from __future__ import annotations

import importlib.util

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


# Logits, not the loss, are compared: at initialisation every model's loss sits at ln(V) within
# a few per cent, so a loss check passes for any near-uniform model, a broken one included. The
# logits of two models are compared by relative distance (``_rel``); two different draws of the
# same shape are ~sqrt(2) apart (1.43 measured in fp32 on CPU), which each test checks for its
# own control so that the bound it asserts is seen to separate right from wrong.
_SHAPE = ["model.num_layers=2", "model.hidden_size=256", "model.num_attention_heads=4",
          "model.num_query_groups=2", "model.seq_length=64", "model.vwn.m=2", "model.vwn.n=4"]
# Rounded stages on the way to the logits in bf16: per layer the two norms, QKV, attention,
# projection, FC1, the SwiGLU product, FC2 and the two GHC reads/writes (8 per layer with the
# residual adds folded in), plus embedding, final norm, reduce and output layer: at most 16 for
# two layers, each a relative error of at most u_bf16 = 2**-8 of the stage's output.
BF16_STAGES = 16
U_BF16 = 2.0**-8


def _logits(overrides, state=None, seed=0):
    """The logits of the configured model for a fixed batch, and its weights (float32).
    ``state`` (the weights of another build, by local-spec name) is loaded when given."""
    from megatron_vwn.config import load_config
    from megatron_vwn.model.builder import build_model

    torch.manual_seed(seed)
    (model,) = build_model(load_config(None, [*_SHAPE, f"train.seed={seed}", *overrides]), 512)
    if state is not None:
        own = model.state_dict()
        if "transformer_impl=transformer_engine" in " ".join(overrides):
            state = _as_te_names(state)
        missing, unexpected = model.load_state_dict(
            {k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), \
            (missing, unexpected)
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, 512, (2, 64), generator=g, device="cuda")
    positions = torch.arange(64, device="cuda").unsqueeze(0).expand(2, -1)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16,
                                         enabled="train.precision=bf16" in overrides):
        logits = model(tokens, positions, None).float()
    return logits, {k: v.detach().float() for k, v in model.state_dict().items()
                    if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _as_te_names(state):
    """Local-spec names -> Transformer Engine spec names: TE fuses each pre-norm into the linear
    after it (``input_layernorm`` into ``linear_qkv``, ``pre_mlp_layernorm`` into ``linear_fc1``);
    every other parameter keeps its name."""
    renames = {".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
               ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight"}
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        out[key] = value
    return out


def test_bf16_logits_are_close_to_fp32(single_process):
    local = ["model.transformer_impl=local"]
    fp32, state = _logits(["train.precision=fp32", *local])
    bf16, _ = _logits(["train.precision=bf16", *local], state)
    other, _ = _logits(["train.precision=bf16", *local], seed=1)
    bound = BF16_STAGES * U_BF16
    assert _rel(bf16, fp32) < bound, _rel(bf16, fp32)
    assert _rel(other, fp32) > 4 * bound, _rel(other, fp32)  # the control: a wrong model fails


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                    reason="Transformer Engine not installed")
def test_transformer_engine_logits_match_the_local_spec(single_process):
    """The TE spec names its norms differently (fused norm + linear): the local model's weights
    are loaded into it under TE's names, so both compute the same function. Each is within
    BF16_STAGES * u of the exact logits, so they are within twice that of each other."""
    local, state = _logits(["train.precision=bf16", "model.transformer_impl=local"])
    te_args = ["train.precision=bf16", "model.transformer_impl=transformer_engine"]
    te, _ = _logits(te_args, state)
    other, _ = _logits(te_args, seed=1)
    bound = 2 * BF16_STAGES * U_BF16
    assert _rel(te, local) < bound, _rel(te, local)
    assert _rel(other, local) > 2 * bound, _rel(other, local)


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None
                    or not torch.cuda.is_available()
                    or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs Transformer Engine and an Ada/Hopper/Blackwell GPU")
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_logits_are_close_to_bf16(single_process, recipe):
    """train.precision=fp8 builds and runs through Transformer Engine (docs/scale.md): from the
    same weights its logits stay within FP8's error of bf16's. e4m3 keeps 3 mantissa bits, a
    relative error of at most 2**-4 per GEMM input; the forward has 8 FP8 GEMMs (QKV,
    projection, FC1, FC2 per layer; the output layer stays bf16), hence 8 * 2**-4."""
    te = ["model.transformer_impl=transformer_engine"]
    bf16, state = _logits(["train.precision=bf16", *te])
    fp8, _ = _logits(["train.precision=fp8", f"train.fp8_recipe={recipe}", *te], state)
    bound = 8 * 2.0**-4
    assert torch.isfinite(fp8).all() and _rel(fp8, bf16) < bound, _rel(fp8, bf16)
    other, _ = _logits(["train.precision=fp8", f"train.fp8_recipe={recipe}", *te], seed=1)
    assert _rel(other, bf16) > bound, _rel(other, bf16)
