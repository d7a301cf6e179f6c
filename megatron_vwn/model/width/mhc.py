"""Manifold-constrained hyper-connections (mHC; DeepSeek, arXiv 2512.24880; docs/methods.md §2.1).

Pure math, no parallelism. ``n`` streams of width ``D``: the wide state ``H`` is ``[s, b, n*D]``
viewed as ``x_l``: ``[T, n, D]``. Around one sublayer ``F`` (its own pre-norm, no residual add):

    x~     = RMSNorm(vec(x_l))                                 [T, n*D], fp32, learnable gain
    l      = x~ [phi_pre | phi_post | phi_res]                 [T, n + n + n^2]
    H_pre  = sigmoid(alpha_pre * l_pre + b_pre)                [T, 1, n]
    H_post = 2 sigmoid(alpha_post * l_post + b_post)           [T, 1, n]
    H_res  = SinkhornKnopp(exp(alpha_res * l_res + b_res))     [T, n, n], doubly stochastic
    x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)                [T, n, D]

``alpha`` are three learnable scalars (init ``gate_init``, 0.01), ``b`` learnable biases.
``dynamic=False`` drops ``phi``, ``alpha`` and the norm: the mappings come from ``b`` alone.

Initialisation (docs/width_family.md): ``phi ~ N(0, init_std)`` (breaks the symmetry of the
replicated streams), ``b_pre = logit(1/n)`` (``H_pre = 1/n``: the read is the streams' mean),
``b_post = 0`` (``H_post = 1``), ``b_res`` = ``identity_bias`` on the diagonal and 0 off it
(0: ``H_res = 1/n``). With equal streams and ``alpha = 0`` every stream is then exactly the
backbone's residual stream whatever ``b_res``, since ``H_res`` is doubly stochastic. (``n = 1``
cannot read with weight 1, ``b_pre = 0`` there; the sublayer's pre-norm absorbs the 1/2.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_vwn.model.width import mhc_reference
from megatron_vwn.model.width.mhc_reference import sinkhorn
from megatron_vwn.model.width.registry import (
    WidthMember,
    register,
    require_single_segment,
)


@dataclass
class MhcConfig:
    """Manifold-constrained hyper-connections (``model.vwn.mhc``; docs/width_family.md,
    docs/methods.md §2.1)."""

    sinkhorn_iters: int = 20
    """Sinkhorn-Knopp iterations (row then column normalisation each) for ``H_res``."""
    gate_init: float = 0.01
    """Initial value of the three learnable scalar gates alpha (pre, post, res)."""
    identity_bias: float = 0.0
    """Initial ``b_res`` on the diagonal (0 off it). 0 starts ``H_res`` at the uniform matrix
    1/n; a large value near the identity, where 20 Sinkhorn iterations converge slowly (rows
    off by about 3e-4 at 4; docs/width_family.md)."""
    reduce: Literal["mean", "sum"] = "mean"
    """How the n streams become the D-wide input of the final norm."""


class MHC(torch.nn.Module):
    """One mHC module around a sublayer.

    Parameters: ``bias`` ``[2n + n^2]`` (pre | post | res, row-major); with ``dynamic``:
    ``norm_weight`` ``[n*D]``, ``proj`` ``[n*D, 2n + n^2]`` (``phi``), ``gate`` ``[3]``
    (alpha_pre, alpha_post, alpha_res). All but ``proj`` carry ``no_weight_decay``.
    """

    def __init__(self, n: int, hidden: int, dynamic: bool = True, sinkhorn_iters: int = 20,
                 gate_init: float = 0.01, identity_bias: float = 0.0, init_std: float = 0.02,
                 eps: float = 1e-6, recompute: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.n, self.hidden = n, hidden
        self.d_b = hidden  # stream width (GHC's segment width with m = 1)
        self.dynamic = dynamic
        self.sinkhorn_iters = sinkhorn_iters
        self.eps = eps
        self.recompute = recompute
        kwargs = dict(dtype=dtype, device=device)
        bias = torch.zeros(2 * n + n * n)
        if n > 1:
            bias[:n] = -math.log(n - 1)  # sigmoid(b_pre) = 1/n
        bias[2 * n:].view(n, n).fill_diagonal_(identity_bias)
        self.bias = torch.nn.Parameter(bias.to(**kwargs))
        self.bias.no_weight_decay = True
        if dynamic:
            self.norm_weight = torch.nn.Parameter(torch.ones(n * hidden, **kwargs))
            self.proj = torch.nn.Parameter(torch.empty(n * hidden, 2 * n + n * n, **kwargs))
            self.gate = torch.nn.Parameter(torch.full((3,), float(gate_init), **kwargs))
            self.norm_weight.no_weight_decay = True
            self.gate.no_weight_decay = True

            def init_proj(weight: torch.Tensor, std: float = init_std) -> None:
                with torch.no_grad():
                    weight.normal_(0.0, std)

            self.proj.layout_init = init_proj  # seeded by its global name on CPU
            init_proj(self.proj)

    def mappings(self, state: torch.Tensor):
        """``state`` ``[T, n, D]`` -> ``H_pre`` ``[T, n]``, ``H_post`` ``[T, n]``, ``H_res``
        ``[T, n, n]``, in fp32 at least."""
        n = self.n
        dtype = torch.promote_types(self.bias.dtype, torch.float32)
        bias = self.bias.to(dtype)
        if self.dynamic:
            flat = state.reshape(state.shape[0], -1).to(dtype)  # [T, n*D]
            normed = F.rms_norm(flat, (flat.shape[-1],), self.norm_weight.to(dtype), self.eps)
            logits = normed @ self.proj.to(dtype)  # [T, 2n + n^2]
            gate = self.gate.to(dtype)
            gates = torch.cat([gate[0].expand(n), gate[1].expand(n), gate[2].expand(n * n)])
            logits = torch.addcmul(bias, logits, gates)
        else:
            logits = bias.expand(state.shape[0], -1)
        pre = torch.sigmoid(logits[:, :n])
        post = 2.0 * torch.sigmoid(logits[:, n:2 * n])
        res = sinkhorn(logits[:, 2 * n:].reshape(-1, n, n), self.sinkhorn_iters)
        return pre, post, res

    def read(self, hidden: torch.Tensor):
        """``[s, b, n*D]`` -> sublayer input ``H_pre x_l`` ``[s, b, D]`` and what
        :meth:`write` needs."""
        s, b, _ = hidden.shape
        state = hidden.reshape(s * b, self.n, self.hidden)  # [T, n, D]
        if self.recompute and torch.is_grad_enabled():
            pre, post, res = checkpoint(self.mappings, state, use_reentrant=False)
        else:
            pre, post, res = self.mappings(state)
        pre, post, res = (t.to(state.dtype) for t in (pre, post, res))
        x = torch.bmm(pre.unsqueeze(1), state)  # [T, 1, D]
        return x.reshape(s, b, self.hidden), (state, post, res)

    def write(self, output: torch.Tensor, saved) -> torch.Tensor:
        """Sublayer output ``[s, b, D]`` -> ``H_res x_l + H_post^T F`` ``[s, b, n*D]``."""
        state, post, res = saved
        s, b, _ = output.shape
        z = output.reshape(s * b, 1, self.hidden)  # [T, 1, D]
        new = torch.baddbmm(torch.bmm(res, state), post.unsqueeze(2), z)  # [T, n, D]
        return new.reshape(s, b, self.n * self.hidden)

    def extra_repr(self) -> str:
        return (f"n={self.n}, hidden={self.hidden}, dynamic={self.dynamic}, "
                f"sinkhorn_iters={self.sinkhorn_iters}")


@register
class MHCMember(WidthMember):
    """``connection=mhc``: ``m = 1``, ``n`` replicated streams, one :class:`MHC` per sublayer,
    the streams' mean (or sum, ``model.vwn.mhc.reduce``) at the exit."""

    name = "mhc"
    embeddings = ("auto", "replicated")
    swept_by_streams = True
    legacy_slots = {"attention_connection": "attention_ghc", "mlp_connection": "mlp_ghc"}
    hf_slot_names = ("attn_ghc", "mlp_ghc")
    hf_params = ("norm_weight", "proj", "bias", "gate")
    reference = mhc_reference

    def validate(self, vwn) -> None:
        require_single_segment(vwn, "the number of streams")

    def embedding(self, vwn) -> str:
        return "replicated"

    def reduce(self, vwn) -> str:
        return vwn.mhc.reduce

    def connection(self, shape, index, dtype, device=None):
        vwn = shape.vwn
        return MHC(shape.n, shape.hidden, dynamic=shape.dynamic,
                   sinkhorn_iters=vwn.mhc.sinkhorn_iters, gate_init=vwn.mhc.gate_init,
                   identity_bias=vwn.mhc.identity_bias, init_std=shape.init_std,
                   eps=shape.norm_epsilon, recompute=shape.recompute_coefficients,
                   dtype=dtype, device=device)

    def module_params(self, vwn, hidden_size: int) -> int:
        """One mHC module (docs/methods.md §2.1): biases ``2n + n^2``; dynamic: ``phi``
        ``nD(2n + n^2)``, the norm gain ``nD`` and three gates."""
        n = vwn.n
        outputs = 2 * n + n * n
        if not vwn.dynamic:
            return outputs
        return outputs + n * hidden_size * (outputs + 1) + 3

    def layer_params(self, vwn, hidden_size: int) -> int:
        return 2 * self.module_params(vwn, hidden_size)

    def module_flops(self, vwn, hidden_size: int) -> int:
        """Forward FLOPs of one mHC module per token: RMSNorm ``4nD``, projection
        ``2nD(2n + n^2)`` (dynamic), ``H_pre x`` ``2nD``, ``H_res x`` ``2n^2 D``, ``H_post^T F``
        ``2nD`` (Sinkhorn's ``O(t n^2)`` is left out)."""
        n, d = vwn.n, hidden_size
        mappings = (4 + 2 * (2 * n + n * n)) * n * d if vwn.dynamic else 0
        return mappings + 4 * n * d + 2 * n * n * d

    def layer_flops(self, vwn, hidden_size: int) -> int:
        return 2 * self.module_flops(vwn, hidden_size)

