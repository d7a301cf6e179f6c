"""The Triton GHC kernels against the torch functions that define their numerics.

Without a GPU they run under Triton's interpreter, which must be on (``TRITON_INTERPRET=1``)
before Triton is first imported in the process — and Megatron-Core imports it. So on a CPU
machine :func:`test_kernels_under_the_interpreter` runs this file again in a subprocess with
the variable set, and the kernel tests themselves skip in the parent process. On a CUDA machine
they run the compiled kernels directly (bf16 ones are in ``tests/gpu/``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_vwn.model.width.ghc import GHC, GHCInit, hc_init, vwn_init

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


def _ghc(m, n, d_b, kind, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    init = {"vwn": vwn_init(m, n, d_b), "hc": hc_init(n, 1),
            "random": GHCInit(read=torch.randn(n, m), carry=torch.randn(n, n),
                              write=torch.randn(m, n), tau=1.5)}[kind]
    ghc = GHC(m, n, d_b, init, dtype=torch.float32, device=DEVICE)
    with torch.no_grad():
        for p in ghc.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return ghc


def _run(ghc, kernel, hidden, z, grad_x, grad_out):
    """x, H' and every gradient (input, sublayer output, parameters) through one kernel."""
    ghc.kernel = kernel
    hidden = hidden.detach().clone().requires_grad_(True)
    z = z.detach().clone().requires_grad_(True)
    x, saved = ghc.read(hidden)
    out = ghc.write(z, saved)
    torch.autograd.backward([x, out], [grad_x, grad_out])
    grads = {name: p.grad.detach().clone() for name, p in ghc.named_parameters()}
    ghc.zero_grad(set_to_none=True)
    return {"x": x.detach(), "out": out.detach(), "d hidden": hidden.grad,
            "d z": z.grad, **grads}


def _rel(actual, expected):
    return ((actual.double() - expected.double()).norm()
            / expected.double().norm().clamp_min(1e-30)).item()


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
def test_triton_matches_torch_in_fp32(m, n, d_b, kind, tokens):
    from megatron_vwn.model.width import ghc_triton

    assert ghc_triton._BLOCK_TOKENS == 16 and ghc_triton._chunk(20, 3, 2) == 32  # the edges above
    ghc = _ghc(m, n, d_b, kind)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    hidden = torch.randn(tokens, 1, n * d_b, generator=g, device=DEVICE)
    z = torch.randn(tokens, 1, m * d_b, generator=g, device=DEVICE)
    grad_x, grad_out = torch.randn_like(z), torch.randn_like(hidden)
    ref = _run(ghc, "torch", hidden, z, grad_x, grad_out)
    got = _run(ghc, "triton", hidden, z, grad_x, grad_out)
    for key, expected in ref.items():
        assert got[key].dtype == expected.dtype, key
        assert got[key].shape == expected.shape, key
        assert _rel(got[key], expected) < 1e-5, (key, _rel(got[key], expected))


@kernels
@pytest.mark.parametrize("m,n,d_b,kind,tokens", [(2, 3, 8, "vwn", 5), (8, 16, 4, "random", 3),
                                                 (1, 4, 16, "hc", 4)])
def test_triton_matches_torch_in_fp16(m, n, d_b, kind, tokens):
    """fp16 state and parameters, fp32 coefficient path in both: equal up to fp16 rounding of
    the intermediate products (which the two round in different places)."""
    ghc = _ghc(m, n, d_b, kind).half()
    g = torch.Generator(device=DEVICE).manual_seed(2)
    hidden = torch.randn(tokens, 1, n * d_b, generator=g, device=DEVICE).half()
    z = torch.randn(tokens, 1, m * d_b, generator=g, device=DEVICE).half()
    grad_x, grad_out = torch.randn_like(z), torch.randn_like(hidden)
    ref = _run(ghc, "torch", hidden, z, grad_x, grad_out)
    got = _run(ghc, "triton", hidden, z, grad_x, grad_out)
    for key, expected in ref.items():
        assert got[key].dtype == expected.dtype == torch.float16, key
        assert torch.isfinite(got[key]).all(), key
        assert _rel(got[key], expected) < 4e-3, (key, _rel(got[key], expected))


@kernels
def test_zero_tokens_and_a_zero_segment():
    ghc = _ghc(2, 4, 16, "vwn")
    hidden = torch.randn(3, 1, 64, device=DEVICE)
    hidden[1, 0, 16:32] = 0  # rstd = eps^-1/2 for that segment
    z, grad_x, grad_out = torch.randn(3, 1, 32), torch.randn(3, 1, 32), torch.randn(3, 1, 64)
    ref = _run(ghc, "torch", hidden, z, grad_x, grad_out)
    got = _run(ghc, "triton", hidden, z, grad_x, grad_out)
    for key, expected in ref.items():
        assert _rel(got[key], expected) < 1e-5, key
    ghc.kernel = "triton"
    x, saved = ghc.read(torch.randn(0, 1, 64))
    assert x.shape == (0, 1, 32) and ghc.write(torch.randn(0, 1, 32), saved).shape == (0, 1, 64)


@kernels
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_ghc_recompute_around_two_sublayers(kernel):
    """``recompute=ghc`` with either kernel: two GHC modules in a row (the second rebuilds its
    input from the first's) give the gradients of the plain torch path."""
    m, n, d_b, tokens = 2, 6, 8, 5
    first, second = _ghc(m, n, d_b, "random", seed=1), _ghc(m, n, d_b, "random", seed=2)
    g = torch.Generator(device=DEVICE).manual_seed(3)
    hidden = torch.randn(tokens, 1, n * d_b, generator=g, device=DEVICE)
    mix = torch.randn(m * d_b, m * d_b, generator=g, device=DEVICE)  # a stand-in sublayer
    results = []
    for mode, kern in (("none", "torch"), ("ghc", kernel)):
        for ghc in (first, second):
            ghc.recompute, ghc.kernel = mode, kern
        h = hidden.clone().requires_grad_(True)
        x, saved = first.read(h)
        mid = first.write(torch.tanh(x @ mix), saved)
        x, saved = second.read(mid)
        out = second.write(torch.tanh(x @ mix), saved)
        out.square().sum().backward()
        results.append((out.detach(), h.grad,
                        {name: p.grad.clone() for name, p in
                         [*first.named_parameters("a"), *second.named_parameters("b")]}))
        first.zero_grad(set_to_none=True)
        second.zero_grad(set_to_none=True)
    (ref_out, ref_h, ref_p), (out, grad_h, grads) = results
    assert _rel(out, ref_out) < 1e-5 and _rel(grad_h, ref_h) < 1e-5
    for name, expected in ref_p.items():
        assert _rel(grads[name], expected) < 1e-5, name
