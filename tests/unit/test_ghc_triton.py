"""The Triton GHC kernels against the torch functions that define their numerics.

Without a GPU they run under Triton's interpreter, which must be on (``TRITON_INTERPRET=1``)
before Triton is first imported in the process — and Megatron-Core imports it. So on a CPU
machine :func:`test_kernels_under_the_interpreter` runs this file again in a subprocess with
the variable set, and the kernel tests themselves skip in the parent process. On a CUDA machine
they run the compiled kernels directly (bf16 ones are in ``tests/gpu/``).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_vwn.model.width.ghc import GHC, GHCInit, hc_init, vwn_init
from megatron_vwn.model.width.ghc_recompute import RecomputeChain

pytest.importorskip("triton")
DIRECT = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
kernels = pytest.mark.skipif(not DIRECT, reason="run under TRITON_INTERPRET=1 by "
                                                "test_kernels_under_the_interpreter")
ROOT = Path(__file__).resolve().parents[2]


def test_kernels_under_the_interpreter():
    if DIRECT:
        pytest.skip("this process runs the kernel tests itself")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings",
                           "-p", "no:cacheprovider", __file__], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    # Everything ran; the only skip is this test itself in the child.
    assert re.search(r"\b\d+ passed, 1 skipped in", proc.stdout), proc.stdout[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only without a GPU")
def test_kernel_selection_without_a_gpu(monkeypatch):
    from megatron_vwn.config import ConfigError, load_config
    from megatron_vwn.model.width.ghc import resolve_kernel

    assert resolve_kernel("auto") == "torch" and resolve_kernel("triton") == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = load_config(None, ["model.vwn.m=2", "model.vwn.n=4", "model.vwn.kernel=triton"])
    with pytest.raises(ConfigError, match="model.vwn.kernel=triton needs a CUDA device or "
                                          "TRITON_INTERPRET=1"):
        cfg.model.vwn.validate(cfg.model.hidden_size)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg.model.vwn.validate(cfg.model.hidden_size)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEEDS = (0, 1, 2)

# How close the kernels must come, and why (relative error in the 2-norm, against fp64 truth):
#
# - FP64: both kernels run in fp64 (``ghc_triton`` accumulates in the state's precision when
#   that is fp64) and are compared with each other. Every result here is a sum along a chain of
#   at most K = 2048 products (tokens * d_b <= 1224 for the parameter gradients, plus the
#   sublayer chain), so rounding contributes at most K * u64 = 2.3e-13 of the summands' scale.
#   The worst gradients below cancel to a fraction of that scale (the fp32 torch path lands
#   up to 1.4e-5 from the truth there, ~100x the random-walk estimate sqrt(K) * u32), so
#   1e3 * K * u64 = 2.3e-10 bounds rounding with room to spare on any CPU, BLAS or summation
#   order (seen: 2e-14), while a logic defect is far above it:
#   ``test_fp64_check_trips_on_a_perturbed_kernel`` plants a 1e-7 relative error and must fail.
# - FP32: the a-priori bound gamma_K = K * u32 = 1.2e-4 (K = 2048) for each fp32 path against
#   fp64 truth. Rounding errors add up like a random walk (sqrt(K) * u32 = 2.7e-6), which leaves
#   room for ~40x cancellation (seen: 1.4e-5); the logic is the fp64 test's job, this one checks
#   that no step drops below fp32 (tf32 or bf16 operands land at 1e-3 to 1e-2).
# - FP16 state (the coefficient path stays fp32, whose rounding is negligible here): a chain
#   rounds to fp16 at no more than four stored intermediates (coefficients, X or H', the
#   gradients), each within u16 = 4.9e-4 of its own scale, and a cancelling gradient may
#   magnify that by the same order as in fp32 (4x allowed): 16 * u16 = 7.8e-3 for each path
#   against fp64 truth (seen: 1.5e-3).
_U64, _U32, _U16 = (torch.finfo(t).eps / 2 for t in (torch.float64, torch.float32,
                                                      torch.float16))
K_MAX = 2048
FP64_BOUND = 1e3 * K_MAX * _U64
FP32_BOUND = K_MAX * _U32
FP16_BOUND = 16 * _U16


def _ghc(m, n, d_b, kind, seed=0):
    torch.manual_seed(seed)
    init = {"vwn": vwn_init(m, n, d_b), "hc": hc_init(n, 1),
            "random": GHCInit(read=torch.randn(n, m), carry=torch.randn(n, n),
                              write=torch.randn(m, n), tau=1.5)}[kind]
    ghc = GHC(m, n, d_b, init, dtype=torch.float32, device=DEVICE)
    with torch.no_grad():
        for p in ghc.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return ghc


def _run(ghc, kernel, hidden, z, grad_x, grad_out, dtype):
    """x, H' and every gradient (input, sublayer output, parameters) through one kernel, with
    the module, state and gradients in ``dtype`` (the inputs are exact in every dtype used)."""
    ghc = copy.deepcopy(ghc).to(dtype)
    ghc.kernel = kernel
    hidden = hidden.detach().to(dtype, copy=True).requires_grad_(True)
    z = z.detach().to(dtype, copy=True).requires_grad_(True)
    x, saved = ghc.read(hidden)
    out = ghc.write(z, saved)
    torch.autograd.backward([x, out], [grad_x.to(dtype), grad_out.to(dtype)])
    grads = {name: p.grad.detach().clone() for name, p in ghc.named_parameters()}
    return {"x": x.detach(), "out": out.detach(), "d hidden": hidden.grad,
            "d z": z.grad, **grads}


def _rel(actual, expected):
    return ((actual.double() - expected.double()).norm()
            / expected.double().norm().clamp_min(1e-30)).item()


def _assert_close(got, truth, bound, dtype):
    for key, expected in truth.items():
        assert got[key].dtype == dtype, key
        assert got[key].shape == expected.shape, key
        assert torch.isfinite(got[key]).all(), key
        assert _rel(got[key], expected) < bound, (key, _rel(got[key], expected), bound)


def _operands(m, n, d_b, tokens, seed, dtype=torch.float32):
    """Inputs rounded to ``dtype`` once, so every dtype's run starts from the same numbers."""
    g = torch.Generator(device=DEVICE).manual_seed(1 + seed)
    hidden = torch.randn(tokens, 1, n * d_b, generator=g, device=DEVICE)
    z = torch.randn(tokens, 1, m * d_b, generator=g, device=DEVICE)
    grad_x, grad_out = torch.randn_like(z), torch.randn_like(hidden)
    return [t.to(dtype) for t in (hidden, z, grad_x, grad_out)]


CASES = [  # (m, n, d_b, init, tokens): VWN shapes, HC, a random init, odd sizes, block edges
    (2, 3, 8, "vwn", 5),
    (8, 16, 4, "vwn", 3),
    (8, 64, 4, "vwn", 2),
    (1, 4, 16, "hc", 7),
    (2, 3, 20, "random", 17),  # one token past a backward block; d_b past a chunk edge
    (3, 5, 72, "random", 1),
]


@pytest.mark.parametrize("m,n,d_b,kind,tokens", CASES)
@kernels
def test_triton_matches_torch_in_fp64(m, n, d_b, kind, tokens):
    from megatron_vwn.model.width import ghc_triton

    assert ghc_triton._BLOCK_TOKENS == 16 and ghc_triton._chunk(20, 3, 2) == 32  # the edges above
    assert max(t * d_b for *_, d_b, _, t in CASES) + 16 * 64 <= K_MAX
    for seed in SEEDS:
        ghc = _ghc(m, n, d_b, kind, seed=seed)
        operands = _operands(m, n, d_b, tokens, seed)
        truth = _run(ghc, "torch", *operands, torch.float64)
        _assert_close(_run(ghc, "triton", *operands, torch.float64), truth, FP64_BOUND,
                      torch.float64)


@kernels
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_fp64_check_trips_on_a_perturbed_kernel(where, monkeypatch):
    """The fp64 bound can fail: a kernel whose read output (or state gradient) is off by a
    relative 1e-7, an error fp32 rounding alone could make, is caught."""
    from megatron_vwn.model.width import ghc_triton

    def perturbed(function, index):
        def apply(ctx, *args):
            results = list(function(ctx, *args))
            results[index] = results[index] * (1 + 1e-7)
            return tuple(results)
        return staticmethod(apply)

    name, index = ("forward", 0) if where == "forward" else ("backward", 0)
    monkeypatch.setattr(ghc_triton.TritonRead, name,
                        perturbed(getattr(ghc_triton.TritonRead, name), index))
    ghc = _ghc(2, 3, 8, "vwn")
    operands = _operands(2, 3, 8, 5, 0)
    truth = _run(ghc, "torch", *operands, torch.float64)
    with pytest.raises(AssertionError, match="x|d hidden"):
        _assert_close(_run(ghc, "triton", *operands, torch.float64), truth, FP64_BOUND,
                      torch.float64)


@pytest.mark.parametrize("m,n,d_b,kind,tokens", CASES)
@kernels
def test_both_kernels_within_fp32_rounding(m, n, d_b, kind, tokens):
    for seed in SEEDS:
        ghc = _ghc(m, n, d_b, kind, seed=seed)
        operands = _operands(m, n, d_b, tokens, seed)
        truth = _run(ghc, "torch", *operands, torch.float64)
        for kernel in ("torch", "triton"):
            _assert_close(_run(ghc, kernel, *operands, torch.float32), truth, FP32_BOUND,
                          torch.float32)


@kernels
@pytest.mark.parametrize("m,n,d_b,kind,tokens", [(2, 3, 8, "vwn", 5), (8, 16, 4, "random", 3),
                                                 (1, 4, 16, "hc", 4)])
def test_both_kernels_within_fp16_rounding(m, n, d_b, kind, tokens):
    """fp16 state and parameters, fp32 coefficient path in both; truth is fp64 on the same
    fp16-rounded numbers."""
    for seed in SEEDS:
        ghc = _ghc(m, n, d_b, kind, seed=seed).half()
        operands = _operands(m, n, d_b, tokens, seed, torch.float16)
        truth = _run(ghc, "torch", *operands, torch.float64)
        for kernel in ("torch", "triton"):
            _assert_close(_run(ghc, kernel, *operands, torch.float16), truth, FP16_BOUND,
                          torch.float16)


@kernels
def test_zero_tokens_and_a_zero_segment():
    ghc = _ghc(2, 4, 16, "vwn")
    hidden, z, grad_x, grad_out = _operands(2, 4, 16, 3, 0)
    hidden[1, 0, 16:32] = 0  # rstd = eps^-1/2 for that segment
    truth = _run(ghc, "torch", hidden, z, grad_x, grad_out, torch.float64)
    _assert_close(_run(ghc, "triton", hidden, z, grad_x, grad_out, torch.float64), truth,
                  FP64_BOUND, torch.float64)
    ghc.kernel = "triton"
    x, saved = ghc.read(torch.randn(0, 1, 64))
    assert x.shape == (0, 1, 32) and ghc.write(torch.randn(0, 1, 32), saved).shape == (0, 1, 64)


def _two_sublayers(first, second, hidden, mix, mode, kernel, dtype):
    """Two GHC modules in a row around a stand-in sublayer, sharing a recompute chain as the
    modules of a model chunk do; the output and every gradient."""
    first, second = copy.deepcopy(first).to(dtype), copy.deepcopy(second).to(dtype)
    chain = RecomputeChain()
    for ghc in (first, second):
        ghc.recompute, ghc.kernel, ghc.recompute_chain = mode, kernel, chain
    h = hidden.detach().to(dtype, copy=True).requires_grad_(True)
    mix = mix.to(dtype)
    x, saved = first.read(h)
    mid = first.write(torch.tanh(x @ mix), saved)
    x, saved = second.read(mid)
    out = second.write(torch.tanh(x @ mix), saved)
    out.square().sum().backward()
    return {"out": out.detach(), "d hidden": h.grad,
            **{name: p.grad.clone() for name, p in
               [*first.named_parameters("a"), *second.named_parameters("b")]}}


@kernels
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_ghc_recompute_around_two_sublayers(kernel):
    """``recompute=ghc`` with either kernel: two GHC modules in a row (the second rebuilds its
    input from the first's) give the gradients of the plain torch path — in fp64, where the
    comparison is exact to rounding (the fp32 gradients of ``b.static_read`` here sit ~1e-5
    from the truth on their own, which is fp32 rounding of a cancelling sum, not a defect)."""
    m, n, d_b, tokens = 2, 6, 8, 5
    for seed in SEEDS:
        first = _ghc(m, n, d_b, "random", seed=1 + 10 * seed)
        second = _ghc(m, n, d_b, "random", seed=2 + 10 * seed)
        g = torch.Generator(device=DEVICE).manual_seed(3 + seed)
        hidden = torch.randn(tokens, 1, n * d_b, generator=g, device=DEVICE)
        mix = torch.randn(m * d_b, m * d_b, generator=g, device=DEVICE)  # a stand-in sublayer
        truth = _two_sublayers(first, second, hidden, mix, "none", "torch", torch.float64)
        got = _two_sublayers(first, second, hidden, mix, "ghc", kernel, torch.float64)
        _assert_close(got, truth, FP64_BOUND, torch.float64)
        got = _two_sublayers(first, second, hidden, mix, "ghc", kernel, torch.float32)
        _assert_close(got, truth, FP32_BOUND, torch.float32)
