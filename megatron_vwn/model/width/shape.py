"""The resolved layout of a wide-state model, shared by every family member.

:class:`VWNShape` is everything the plumbing needs from ``model.vwn``: how wide the state is
(what pipeline stages exchange), how it starts (embedding), how it ends (reduce), whether the
connection wraps each sublayer (GHC, HC, Frac, mHC) or the whole layer (AltUp), and which math
module builds the connection. Adding a member means a math module in this package and a branch
in :meth:`VWNShape.make_sublayer_connection` or :meth:`VWNShape.make_layer_connection`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_vwn.config.schema import VwnConfig

SUBLAYER_CONNECTIONS = ("ghc", "hc", "frac", "mhc")
"""Members with one module around attention and one around the MLP (residual adds removed)."""
LAYER_CONNECTIONS = ("altup",)
"""Members that run the stock layer, residual included, inside one module."""


@dataclass(frozen=True)
class VWNShape:
    """The resolved virtual-width layout of a model (what the modules need from the config)."""

    m: int
    n: int
    hidden: int
    connection: str
    embedding: str
    """Resolved: wide | factorized | replicated | projected (Gemma 3n's AltUp) | none."""
    dynamic: bool
    group_norm: bool
    recompute_coefficients: bool
    output_init_scale: float
    reduce: str = "ghc"
    """ghc (GroupNorm + W_reduce) | sum | mean | active | none."""
    num_layers: int = 1
    sinkhorn_iters: int = 20
    gate_init: float = 0.01
    identity_bias: float = 0.0
    selection: str = "alternating"
    init_std: float = 0.02
    kernel: str = "torch"
    """Dynamic GHC implementation (``model.vwn.kernel``, resolved in ``ghc.resolve_kernel``)."""
    recompute: str = "none"
    """``model.vwn.recompute`` with its alias folded in (``VwnConfig.recompute_mode``)."""
    norm_epsilon: float = 1e-6
    """``model.vwn.norm_epsilon``: the connections' own RMSNorms."""

    @classmethod
    def from_config(cls, vwn: VwnConfig, hidden_size: int, num_layers: int = 1,
                    init_std: float = 0.02) -> VWNShape:
        scale = vwn.output_init_scale
        if scale is None:
            scale = 1.0 / math.sqrt(vwn.n) if vwn.connection == "hc" else 1.0
        reduce = {"hc": "sum", "mhc": vwn.mhc.reduce, "altup": vwn.altup.reduce}.get(
            vwn.connection, "ghc" if vwn.n > vwn.m else "none")
        return cls(m=vwn.m, n=vwn.n, hidden=hidden_size, connection=vwn.connection,
                   embedding=vwn.resolved_embedding, dynamic=vwn.dynamic,
                   group_norm=vwn.use_group_norm,
                   recompute_coefficients=vwn.recompute_coefficients,
                   output_init_scale=scale, reduce=reduce, num_layers=num_layers,
                   sinkhorn_iters=vwn.mhc.sinkhorn_iters, gate_init=vwn.mhc.gate_init,
                   identity_bias=vwn.mhc.identity_bias, selection=vwn.altup.selection,
                   init_std=init_std, kernel=vwn.kernel, recompute=vwn.recompute_mode,
                   norm_epsilon=vwn.norm_epsilon)

    @property
    def d_b(self) -> int:
        return self.hidden // self.m

    @property
    def width(self) -> int:
        """D' = n * d_b."""
        return self.n * self.d_b

    @property
    def wraps_layer(self) -> bool:
        """True for members that wrap the whole stock layer (AltUp)."""
        return self.connection in LAYER_CONNECTIONS

    def active_block(self, layer_index: int) -> int:
        """AltUp's computed block ``j*`` of global layer ``layer_index`` (0-based)."""
        return layer_index % self.n if self.selection == "alternating" else 0

    def make_sublayer_connection(self, sublayer_index: int, dtype: torch.dtype, device=None):
        """The module around global sublayer ``sublayer_index`` (2l: attention, 2l+1: MLP),
        with ``read(H) -> (x, saved)`` and ``write(z, saved) -> H'``."""
        if self.connection == "mhc":
            from megatron_vwn.model.width.mhc import MHC

            return MHC(self.n, self.hidden, dynamic=self.dynamic,
                       sinkhorn_iters=self.sinkhorn_iters, gate_init=self.gate_init,
                       identity_bias=self.identity_bias, init_std=self.init_std,
                       eps=self.norm_epsilon, recompute=self.recompute_coefficients,
                       dtype=dtype, device=device)
        from megatron_vwn.model.width.ghc import GHC, hc_init, vwn_init

        if self.connection == "hc":
            init = hc_init(self.n, sublayer_index)
        else:
            init = vwn_init(self.m, self.n, self.d_b)
        return GHC(self.m, self.n, self.d_b, init, dynamic=self.dynamic, eps=self.norm_epsilon,
                   recompute_coefficients=self.recompute_coefficients, dtype=dtype,
                   device=device, kernel=self.kernel, recompute=self.recompute)

    def make_layer_connection(self, layer_index: int, dtype: torch.dtype, device=None):
        """The module around the whole global layer ``layer_index`` (AltUp), same interface."""
        from megatron_vwn.model.width.altup import AltUp

        return AltUp(self.n, self.hidden, self.active_block(layer_index), dynamic=self.dynamic,
                     init_std=self.init_std, eps=self.norm_epsilon, dtype=dtype, device=device)
