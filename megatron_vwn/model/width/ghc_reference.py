"""GHC straight from its equations in plain torch (docs/vwn.md; docs/methods.md §1.2).

Self-contained (torch only): ``megatron-vwn convert hf`` copies this file beside the exported
``modeling_vwn.py``, whose ``VWNForCausalLM`` builds its GHC, HC and Frac connections from
:class:`GHCReference`; the unit tests check the fused training module (``ghc.py``) against it.
Tensors are ``[..., D']`` with any leading dims. Around one sublayer ``T``:

    X  = A_read(H)^T H                    [n, d_b] -> [m, d_b] -> x in R^D
    Z  = T(x)                             the sublayer (its pre-norm inside, no residual add)
    H' = B(H)^T Z + A_carry(H)^T H        [n, d_b]

    dynamic part (fp32 at least):  Hn = RMSNorm_{d_b}(H);  C = tanh(Hn [W_a | W_b] / tau)
                                   A(H) = S_a * C[:, :m+n] + [A_read | A_carry]
                                   B(H) = (S_b * C[:, m+n:])^T + B
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GHCReference(nn.Module):
    """One generalized hyper-connection (static + optional dynamic coefficients).

    ``static_read`` ``[n, m]``, ``static_carry`` ``[n, n]``, ``static_write`` ``[m, n]``;
    dynamic: ``norm_weight`` ``[d_b]``, ``proj`` ``[d_b, 2m + n]``, ``scale_a`` ``[n, m + n]``,
    ``scale_b`` ``[n, m]`` (``[1]`` each with scalar scales, HC). The parameters start at
    :meth:`reset_parameters`; a checkpoint or the training module sets them.
    """

    def __init__(self, m: int, n: int, d_b: int, dynamic: bool = True, tau: float = 1.0,
                 eps: float = 1e-6, scalar_scales: bool = False):
        super().__init__()
        self.m, self.n, self.d_b = m, n, d_b
        self.dynamic = dynamic
        self.tau = tau
        self.eps = eps
        self.static_read = nn.Parameter(torch.empty(n, m))
        self.static_carry = nn.Parameter(torch.empty(n, n))
        self.static_write = nn.Parameter(torch.empty(m, n))
        if dynamic:
            self.norm_weight = nn.Parameter(torch.empty(d_b))
            self.proj = nn.Parameter(torch.empty(d_b, 2 * m + n))
            self.scale_a = nn.Parameter(torch.empty((1,) if scalar_scales else (n, m + n)))
            self.scale_b = nn.Parameter(torch.empty((1,) if scalar_scales else (n, m)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """VWN's initialisation: read the first ``m`` segments, carry every slot, write block
        ``j mod m`` into slot ``j``; no dynamic part (``proj = 0``, unit scales)."""
        m, n = self.m, self.n
        self.static_read.zero_()
        self.static_read[:m].copy_(torch.eye(m))
        self.static_carry.copy_(torch.eye(n))
        self.static_write.zero_()
        for j in range(n):
            self.static_write[j % m, j] = 1.0
        if self.dynamic:
            self.norm_weight.fill_(1.0)
            self.proj.zero_()
            self.scale_a.fill_(1.0)
            self.scale_b.fill_(1.0)

    def coefficients(self, state: torch.Tensor):
        """Read ``[T, n, m]``, carry ``[T, n, n]``, write ``[T, m, n]`` for ``state [T, n, d_b]``
        (the static 2-D matrices when not dynamic)."""
        if not self.dynamic:
            return self.static_read, self.static_carry, self.static_write
        compute = torch.promote_types(state.dtype, torch.float32)
        normed = F.rms_norm(state.to(compute), (self.d_b,), self.norm_weight.to(compute),
                            self.eps)
        coeffs = torch.tanh(normed @ self.proj.to(compute) / self.tau)
        mn = self.m + self.n
        dyn_a = self.scale_a.to(compute) * coeffs[..., :mn]
        dyn_b = self.scale_b.to(compute) * coeffs[..., mn:]
        a = dyn_a + torch.cat([self.static_read, self.static_carry], dim=1).to(compute)
        a = a.to(state.dtype)
        write = (dyn_b.transpose(-1, -2) + self.static_write.to(compute)).to(state.dtype)
        return a[..., : self.m], a[..., self.m:], write

    def read(self, hidden: torch.Tensor):
        """``[..., D']`` -> sublayer input ``[..., D]`` and what :meth:`write` needs."""
        state = hidden.reshape(-1, self.n, self.d_b)
        read, carry, write = self.coefficients(state)
        x = torch.matmul(read.transpose(-1, -2), state)  # [T, m, d_b]
        return x.reshape(*hidden.shape[:-1], self.m * self.d_b), (state, carry, write)

    def write(self, output: torch.Tensor, saved) -> torch.Tensor:
        """Sublayer output ``[..., D]`` -> new wide state ``[..., D']``."""
        state, carry, write = saved
        blocks = output.reshape(-1, self.m, self.d_b)
        if self.dynamic:
            coeff = torch.cat([write, carry], dim=-2)  # [T, m + n, n]
            new = torch.matmul(coeff.transpose(-1, -2), torch.cat([blocks, state], dim=-2))
        else:
            new = torch.matmul(write.t(), blocks) + torch.matmul(carry.t(), state)
        return new.reshape(*output.shape[:-1], self.n * self.d_b)


def hf_connection(config, active: int = 0) -> GHCReference:
    """The module ``VWNForCausalLM`` puts around each sublayer (GHC, HC and Frac), from its
    ``VWNConfig``; ``active`` is a layer member's and unused here."""
    return GHCReference(config.vwn_m, config.vwn_n, config.segment_width,
                        dynamic=config.vwn_dynamic, tau=config.vwn_tau, eps=config.ghc_norm_eps,
                        scalar_scales=config.vwn_scalar_scales)
