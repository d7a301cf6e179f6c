"""Generalized hyper-connections (GHC): the width connection of Virtual Width Networks.

Pure math, no parallelism. The wide residual state ``H`` is ``[s, b, D']`` viewed as
``[s, b, n, d_b]`` (``n`` segments of width ``d_b = D / m``). Around one sublayer ``T``
(METHODS.md 1.2, VWN Eqs. 5-12):

    X  = Å^T H          read:  [n, d_b] -> [m, d_b], flattened to the backbone's x in R^D
    Z  = T(X)           the sublayer (its own pre-norm, no residual add), [m, d_b]
    H' = B^T Z + Â^T H  write: output blocks into slots plus the carried state

with ``A = [Å | Â]`` (``[n, m + n]``) and ``B`` (``[m, n]``). Dynamic GHC adds token-dependent
terms from one GEMM on the per-segment RMS-normalised state, in fp32:

    Hn   = RMSNorm_{d_b}(H)                        [s, b, n, d_b]
    C    = tanh(Hn [W_a | W_b] / tau)              [s, b, n, m + n + m]
    A(H) = S_a * C[..., :m+n] + A                  row i from segment i
    B(H) = (S_b * C[..., m+n:])^T + B              [s, b, m, n]

The write is one batched matmul: ``H' = [B(H); Â(H)]^T [Z; H]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class GHCInit:
    """Static coefficients at initialisation and how the dynamic part is scaled."""

    read: torch.Tensor
    """Å: [n, m]."""
    carry: torch.Tensor
    """Â: [n, n]."""
    write: torch.Tensor
    """B: [m, n]."""
    scale: float = 1.0
    """Initial value of the dynamic scales S_a, S_b."""
    scalar_scales: bool = False
    """HC's single learnable scalar per scale instead of VWN's elementwise matrices."""
    tau: float = 1.0
    """Temperature of the tanh."""


def vwn_init(m: int, n: int, d_b: int) -> GHCInit:
    """VWN Eqs. 11-12: read the first m segments, carry everything, slot j gets block j mod m;
    ``S = 1``, ``tau = sqrt(d_b)``. With ``n = m`` this is frac-connections' init (read, carry
    and write all identity)."""
    read = torch.zeros(n, m)
    read[:m] = torch.eye(m)
    write = torch.zeros(m, n)
    for j in range(n):
        write[j % m, j] = 1.0
    return GHCInit(read=read, carry=torch.eye(n), write=write, tau=math.sqrt(d_b))


def hc_init(n: int, sublayer_index: int) -> GHCInit:
    """Hyper-connections: sublayer k reads stream k mod n, writes to every stream, carries all;
    scalar scales 0.01, no temperature."""
    read = torch.zeros(n, 1)
    read[sublayer_index % n, 0] = 1.0
    return GHCInit(read=read, carry=torch.eye(n), write=torch.ones(1, n), scale=0.01,
                   scalar_scales=True, tau=1.0)


class GHC(torch.nn.Module):
    """One generalized hyper-connection module (static + optional dynamic coefficients).

    Parameters: ``static_read`` Å ``[n, m]``, ``static_carry`` Â ``[n, n]``, ``static_write``
    B ``[m, n]``; dynamic: ``norm_weight`` ``[d_b]``, ``proj`` ``[d_b, 2m + n]`` (W_a | W_b,
    zero-initialised), ``scale_a`` ``[n, m + n]`` and ``scale_b`` ``[n, m]`` (or ``[1]`` each
    for HC). Static coefficients and scales carry ``no_weight_decay``.
    """

    def __init__(self, m: int, n: int, d_b: int, init: GHCInit, dynamic: bool = True,
                 eps: float = 1e-6, recompute_coefficients: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.m, self.n, self.d_b = m, n, d_b
        self.dynamic = dynamic
        self.eps = eps
        self.tau = init.tau
        self.recompute_coefficients = recompute_coefficients
        kwargs = dict(dtype=dtype, device=device)

        def param(value: torch.Tensor, decay: bool) -> torch.nn.Parameter:
            p = torch.nn.Parameter(value.to(**kwargs).clone())
            if not decay:
                p.no_weight_decay = True
            return p

        self.static_read = param(init.read, decay=False)
        self.static_carry = param(init.carry, decay=False)
        self.static_write = param(init.write, decay=False)
        if dynamic:
            scale_a = (1,) if init.scalar_scales else (n, m + n)
            scale_b = (1,) if init.scalar_scales else (n, m)
            self.norm_weight = param(torch.ones(d_b), decay=False)
            self.proj = param(torch.zeros(d_b, 2 * m + n), decay=True)
            self.scale_a = param(torch.full(scale_a, init.scale), decay=False)
            self.scale_b = param(torch.full(scale_b, init.scale), decay=False)

    def _dynamic_terms(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 coefficient path: ``[T, n, d_b]`` -> A terms ``[T, n, m + n]``, B terms
        ``[T, n, m]`` (not yet transposed)."""
        normed = F.rms_norm(state.float(), (self.d_b,), self.norm_weight.float(), self.eps)
        coeffs = torch.tanh(normed @ self.proj.float() / self.tau)
        mn = self.m + self.n
        return self.scale_a.float() * coeffs[..., :mn], self.scale_b.float() * coeffs[..., mn:]

    def coefficients(self, state: torch.Tensor):
        """Per-token read ``[T, n, m]``, carry ``[T, n, n]`` and write ``[T, m, n]`` (or static
        2-D matrices when not dynamic) for the flattened state ``[T, n, d_b]``."""
        if not self.dynamic:
            return self.static_read, self.static_carry, self.static_write
        if self.recompute_coefficients and torch.is_grad_enabled():
            dyn_a, dyn_b = checkpoint(self._dynamic_terms, state, use_reentrant=False)
        else:
            dyn_a, dyn_b = self._dynamic_terms(state)
        a = (dyn_a + torch.cat([self.static_read, self.static_carry], dim=1).float())
        a = a.to(state.dtype)
        read, carry = a[..., : self.m], a[..., self.m:]
        write = (dyn_b.transpose(-1, -2) + self.static_write.float()).to(state.dtype)
        return read, carry, write

    def read(self, hidden: torch.Tensor):
        """``[s, b, D']`` -> backbone input ``[s, b, D]`` and what :meth:`write` needs."""
        s, b, _ = hidden.shape
        state = hidden.reshape(s * b, self.n, self.d_b)  # [T, n, d_b]
        read, carry, write = self.coefficients(state)
        x = torch.matmul(read.transpose(-1, -2), state)  # [T, m, d_b]
        return x.reshape(s, b, self.m * self.d_b), (state, carry, write)

    def write(self, output: torch.Tensor, saved) -> torch.Tensor:
        """Sublayer output ``[s, b, D]`` -> new wide state ``[s, b, D']``."""
        state, carry, write = saved
        s, b, _ = output.shape
        blocks = output.reshape(s * b, self.m, self.d_b)  # [T, m, d_b]
        if self.dynamic:
            coeff = torch.cat([write, carry], dim=-2)  # [T, m + n, n]
            new = torch.matmul(coeff.transpose(-1, -2), torch.cat([blocks, state], dim=-2))
        else:
            new = torch.matmul(write.t(), blocks) + torch.matmul(carry.t(), state)
        return new.reshape(s, b, self.n * self.d_b)

    def extra_repr(self) -> str:
        return f"m={self.m}, n={self.n}, d_b={self.d_b}, dynamic={self.dynamic}, tau={self.tau:g}"
