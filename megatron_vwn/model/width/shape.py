"""The resolved layout of a wide-state model, shared by every family member.

:class:`VWNShape` is everything the plumbing needs from ``model.vwn``: how wide the state is
(what pipeline stages exchange), how it starts (embedding), how it ends (reduce), whether the
connection wraps each sublayer or the whole layer, and the registered member
(:mod:`megatron_vwn.model.width.registry`) that builds the connection modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from megatron_vwn.model.width.registry import WidthMember, member_of

if TYPE_CHECKING:
    from megatron_vwn.config.schema import VwnConfig


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
    init_std: float = 0.02
    kernel: str = "torch"
    """Dynamic GHC implementation (``model.vwn.kernel``, resolved in ``ghc.resolve_kernel``)."""
    recompute: str = "none"
    """``model.vwn.recompute`` with its alias folded in (``VwnConfig.recompute_mode``)."""
    norm_epsilon: float = 1e-6
    """``model.vwn.norm_epsilon``: the connections' own RMSNorms."""
    vwn: VwnConfig | None = field(default=None, hash=False)
    """``model.vwn`` itself, for the member's own keys (``model.vwn.mhc.*``, ...)."""

    @classmethod
    def from_config(cls, vwn: VwnConfig, hidden_size: int, num_layers: int = 1,
                    init_std: float = 0.02) -> VWNShape:
        scale = vwn.output_init_scale
        if scale is None:
            scale = vwn.member.output_init_scale(vwn)
        return cls(m=vwn.m, n=vwn.n, hidden=hidden_size, connection=vwn.connection,
                   embedding=vwn.resolved_embedding, dynamic=vwn.dynamic,
                   group_norm=vwn.use_group_norm,
                   recompute_coefficients=vwn.recompute_coefficients,
                   output_init_scale=scale, reduce=vwn.resolved_reduce, num_layers=num_layers,
                   init_std=init_std, kernel=vwn.kernel, recompute=vwn.recompute_mode,
                   norm_epsilon=vwn.norm_epsilon, vwn=vwn)

    @property
    def member(self) -> WidthMember:
        return member_of(self.connection)

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
        return self.member.wraps_layer

    def make_connection(self, index: int, dtype: torch.dtype, device=None) -> torch.nn.Module:
        """The member's module for global sublayer ``index`` (``2l`` attention, ``2l + 1``
        MLP) or, for members that wrap the layer, global layer ``index``; it has
        ``read(H) -> (x, saved)`` and ``write(y, saved) -> H'``."""
        return self.member.connection(self, index, dtype, device)
