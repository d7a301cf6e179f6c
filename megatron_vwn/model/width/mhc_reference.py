"""mHC straight from its equations in plain torch (docs/width_family.md; docs/methods.md §2.1).

Self-contained (torch only): ``megatron-vwn convert hf`` copies this file beside the exported
``modeling_vwn.py``, whose ``VWNForCausalLM`` builds its mHC connections from
:class:`MHCReference`; the training module (``mhc.py``) shares :func:`sinkhorn` and is checked
against :class:`MHCReference` by the unit tests. ``m = 1``, ``n`` streams of ``D``:

    x~ = RMSNorm(vec(x)) (fp32 at least);  l = x~ [phi_pre | phi_post | phi_res]
    H_pre = sigmoid(a_pre l_pre + b_pre), H_post = 2 sigmoid(a_post l_post + b_post),
    H_res = SinkhornKnopp(exp(a_res l_res + b_res));  x' = H_res x + H_post^T F(H_pre x)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """``SinkhornKnopp(exp(logits))`` over the last two dims ``[..., n, n]``: ``iters`` rounds of
    row then column normalisation (columns sum to 1 exactly, rows to within the convergence).
    The per-matrix maximum is subtracted first (the result does not depend on a scale)."""
    matrix = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        matrix = matrix / matrix.sum(dim=-1, keepdim=True)
        matrix = matrix / matrix.sum(dim=-2, keepdim=True)
    return matrix


class MHCReference(nn.Module):
    """One mHC module: ``bias`` ``[2n + n^2]``; dynamic: ``norm_weight`` ``[n D]``, ``proj``
    ``[n D, 2n + n^2]``, ``gate`` ``[3]``. Mappings in fp32 at least."""

    def __init__(self, n: int, hidden: int, dynamic: bool = True, sinkhorn_iters: int = 20,
                 eps: float = 1e-6):
        super().__init__()
        self.n, self.hidden = n, hidden
        self.dynamic = dynamic
        self.iters = sinkhorn_iters
        self.eps = eps
        self.bias = nn.Parameter(torch.empty(2 * n + n * n))
        if dynamic:
            self.norm_weight = nn.Parameter(torch.empty(n * hidden))
            self.proj = nn.Parameter(torch.empty(n * hidden, 2 * n + n * n))
            self.gate = nn.Parameter(torch.empty(3))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero logits and gates (a checkpoint or the training module sets the real values)."""
        self.bias.zero_()
        if self.dynamic:
            self.norm_weight.fill_(1.0)
            self.proj.zero_()
            self.gate.zero_()

    def read(self, hidden: torch.Tensor):
        """``[..., n*D]`` -> sublayer input ``H_pre x`` ``[..., D]`` and what :meth:`write`
        needs."""
        n = self.n
        state = hidden.reshape(-1, n, self.hidden)
        compute = torch.promote_types(state.dtype, torch.float32)
        logits = self.bias.to(compute).expand(state.shape[0], -1)
        if self.dynamic:
            flat = state.reshape(state.shape[0], -1).to(compute)
            normed = F.rms_norm(flat, (flat.shape[-1],), self.norm_weight.to(compute), self.eps)
            g = self.gate.to(compute)
            gates = torch.cat([g[0].expand(n), g[1].expand(n), g[2].expand(n * n)])
            logits = logits + (normed @ self.proj.to(compute)) * gates
        pre = torch.sigmoid(logits[:, :n]).to(state.dtype)
        post = (2.0 * torch.sigmoid(logits[:, n:2 * n])).to(state.dtype)
        res = sinkhorn(logits[:, 2 * n:].reshape(-1, n, n), self.iters).to(state.dtype)
        x = torch.matmul(pre.unsqueeze(1), state)  # [T, 1, D]
        return x.reshape(*hidden.shape[:-1], self.hidden), (state, post, res)

    def write(self, output: torch.Tensor, saved) -> torch.Tensor:
        """Sublayer output ``[..., D]`` -> ``H_res x + H_post^T F`` ``[..., n*D]``."""
        state, post, res = saved
        new = torch.matmul(res, state) + post.unsqueeze(2) * output.reshape(-1, 1, self.hidden)
        return new.reshape(*output.shape[:-1], self.n * self.hidden)


def hf_connection(config, active: int = 0) -> MHCReference:
    """The module ``VWNForCausalLM`` puts around each sublayer, from its ``VWNConfig``;
    ``active`` is a layer member's and unused here."""
    return MHCReference(config.vwn_n, config.hidden_size, dynamic=config.vwn_dynamic,
                        sinkhorn_iters=config.mhc_sinkhorn_iters, eps=config.ghc_norm_eps)
