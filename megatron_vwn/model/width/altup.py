"""Alternating updates (AltUp, arXiv 2301.13310; docs/methods.md §3): the paper's static variant and
Gemma 3n's dynamic one.

Pure math, no parallelism. ``K`` blocks of width ``D``: the wide state ``H`` is ``[s, b, K*D]``
viewed as ``x``: ``[T, K, D]``. Around the whole transformer layer ``L`` (residual included),
which computes block ``j*`` (``layer mod K``, or 0 with ``selection=same``).

Static (the paper):

    predict:  x^_i = sum_j p_ij x_j                      p = I + p_delta   [K, K]
    compute:  x~   = L(x_{j*})                                            [T, D]
    correct:  y_i  = x^_i + g_i (x~ - x^_{j*})           g = 1 + g_delta   [K]

``p_delta`` and ``g_delta`` start at 0, so at init ``y_i = x_i`` for ``i != j*`` and
``y_{j*} = L(x_{j*})``; with equal blocks (Recycled-AltUp) every block follows the backbone.

Dynamic (Gemma 3n's ``Gemma3nTextAltUp``), per token, router in fp32:

    r(v)  = tanh(W_r (RMSNorm(v) / D))                   W_r: [K, D], learnable norm gain
    p     = I + reshape(C r(x_{j*}), [K, K])             C: [K^2, K], weights clipped to +-120
    x~    = L(x^_{j*})                                   the layer runs on the prediction
    g     = 1 + c r(x~)                                  c: [K, K], clipped likewise
    y_i   = x^_i + g_i (x~ - x^_{j*})

``C`` and ``c`` start at 0 (so ``p = I``, ``g = 1`` at init, as in the static variant); the
router starts ``N(0, init_std)``. The clip is applied functionally in training (Gemma clamps the
weights in place; an optimizer that keeps fp32 master weights would undo that). Gemma's
per-dimension output scale only feeds its per-layer inputs, which this backbone has not; it is
left out. The embedding projections and the projected mean at the exit live in ``vwn_io.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.model.width import altup_reference
from megatron_vwn.model.width.registry import (
    LAYER_SLOTS,
    WidthMember,
    register,
    require_single_segment,
)


@dataclass
class AltUpConfig:
    """Alternating updates (``model.vwn.altup``; docs/width_family.md, docs/methods.md §3)."""

    selection: Literal["alternating", "same"] = "alternating"
    """Which block a layer computes: ``layer mod K`` (alternating) or always block 0 (same)."""
    reduce: Literal["sum", "mean", "active"] = "sum"
    """How the K blocks become the D-wide input of the final norm: their sum, their mean, or
    the block the last layer computed."""

COEFFICIENT_CLIP = 120.0
"""Gemma 3n's ``altup_coef_clip``."""


class AltUp(torch.nn.Module):
    """One AltUp predict/correct pair around the layer that computes block ``active``.

    Static parameters: ``predict_delta`` ``[K, K]`` and ``correct_delta`` ``[K]``, zero at
    init. Dynamic: ``router_norm`` ``[D]``, ``router`` ``[K, D]``, ``predict_coefs``
    ``[K^2, K]``, ``correct_coefs`` ``[K, K]``. All but ``router`` carry ``no_weight_decay``.
    """

    def __init__(self, blocks: int, hidden: int, active: int, dynamic: bool = False,
                 init_std: float = 0.02, eps: float = 1e-6,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.blocks, self.hidden, self.active = blocks, hidden, active
        self.dynamic = dynamic
        self.eps = eps
        kwargs = dict(dtype=dtype, device=device)

        def param(value: torch.Tensor, decay: bool = False) -> torch.nn.Parameter:
            p = torch.nn.Parameter(value)
            if not decay:
                p.no_weight_decay = True
            return p

        if not dynamic:
            self.predict_delta = param(torch.zeros(blocks, blocks, **kwargs))
            self.correct_delta = param(torch.zeros(blocks, **kwargs))
            return
        self.router_norm = param(torch.ones(hidden, **kwargs))
        self.router = param(torch.empty(blocks, hidden, **kwargs), decay=True)
        self.predict_coefs = param(torch.zeros(blocks * blocks, blocks, **kwargs))
        self.correct_coefs = param(torch.zeros(blocks, blocks, **kwargs))

        def init_router(weight: torch.Tensor, std: float = init_std) -> None:
            with torch.no_grad():
                weight.normal_(0.0, std)

        self.router.layout_init = init_router  # seeded by its global name on CPU
        init_router(self.router)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Gemma 3n's router ``tanh(W_r (RMSNorm(x) / D))``: ``[T, D]`` -> ``[T, K]`` (fp32)."""
        dtype = torch.promote_types(self.router.dtype, torch.float32)
        normed = F.rms_norm(x.to(dtype), (self.hidden,), self.router_norm.to(dtype), self.eps)
        return torch.tanh(F.linear(normed / self.hidden, self.router.to(dtype)))

    def _clipped(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            weight = weight.clamp(-COEFFICIENT_CLIP, COEFFICIENT_CLIP)
        return weight

    def read(self, hidden: torch.Tensor):
        """``[s, b, K*D]`` -> the layer's input ``[s, b, D]`` (the active block, or its
        prediction when dynamic) and the prediction ``x^`` ``[T, K, D]``."""
        s, b, _ = hidden.shape
        state = hidden.reshape(s * b, self.blocks, self.hidden)  # [T, K, D]
        if self.dynamic:
            modes = self.route(state[:, self.active])  # [T, K]
            coefs = F.linear(modes, self._clipped(self.predict_coefs.to(modes.dtype)))
            coefs = coefs.view(-1, self.blocks, self.blocks).to(state.dtype)  # [T, K, K]
            predicted = torch.baddbmm(state, coefs, state)  # x + C(r) x
            layer_input = predicted[:, self.active]
        else:
            eye = torch.eye(self.blocks, dtype=state.dtype, device=state.device)
            predict = eye + self.predict_delta.to(state.dtype)
            predicted = torch.matmul(predict, state)  # [T, K, D]: x^_i = sum_j p_ij x_j
            layer_input = state[:, self.active]
        return layer_input.reshape(s, b, self.hidden), predicted

    def write(self, output: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """Layer output ``x~`` ``[s, b, D]`` -> corrected blocks ``[s, b, K*D]``."""
        s, b, _ = output.shape
        computed = output.reshape(s * b, 1, self.hidden)
        innovation = computed - predicted[:, self.active:self.active + 1]  # [T, 1, D]
        if self.dynamic:
            modes = self.route(computed[:, 0])
            gain = F.linear(modes, self._clipped(self.correct_coefs.to(modes.dtype)))
            correct = (1.0 + gain).to(output.dtype).unsqueeze(-1)  # [T, K, 1]
        else:
            correct = (1.0 + self.correct_delta.to(output.dtype)).view(1, -1, 1)  # [1, K, 1]
        new = torch.addcmul(predicted, correct, innovation)  # [T, K, D]
        return new.reshape(s, b, self.blocks * self.hidden)

    def extra_repr(self) -> str:
        return (f"blocks={self.blocks}, hidden={self.hidden}, active={self.active}, "
                f"dynamic={self.dynamic}")


def init_stream_projections(weight: torch.Tensor) -> None:
    """Gemma 3n's stream projections ``[K-1, D, D]`` start ``N(0, 1/D)``, which keeps the
    input's scale: the RMS matching divides by ``max(mean square, 1e-5)``, and a projection
    drawn at the hidden-layer std (0.02) of an embedding of that std would fall below the clamp
    (Gemma's embeddings are ``sqrt(D)`` times larger)."""
    with torch.no_grad():
        weight.normal_(0.0, weight.shape[-1] ** -0.5)


def active_block(shape, layer_index: int) -> int:
    """The block ``j*`` global layer ``layer_index`` (0-based) computes, for a
    :class:`~megatron_vwn.model.width.shape.VWNShape` of ``connection=altup``."""
    return layer_index % shape.n if shape.vwn.altup.selection == "alternating" else 0


@register
class AltUpMember(WidthMember):
    """``connection=altup``: ``m = 1``, ``n = K`` blocks, one :class:`AltUp` around each whole
    layer. The paper's static predict/correct by default; ``model.vwn.dynamic=true`` is Gemma
    3n's router variant (projected streams at entry and exit, ``vwn_io.py``);
    ``model.vwn.embedding=replicated`` is Recycled-AltUp."""

    name = "altup"
    wraps_layer = True
    slots = LAYER_SLOTS
    legacy_slots = {"layer_connection": "altup"}
    hf_slot_names = ("altup",)
    dynamic_default = False
    swept_by_streams = True
    embeddings = ("auto", "wide", "replicated")
    tied_embedding = "replicated"
    hf_params = ("predict_delta", "correct_delta", "router_norm", "router", "predict_coefs",
                 "correct_coefs")
    reference = altup_reference

    def validate(self, vwn) -> None:
        require_single_segment(vwn, "K, the number of blocks")
        if vwn.dynamic and vwn.embedding != "auto":
            raise ConfigError(
                f"model.vwn.embedding={vwn.embedding} does not go with model.vwn.connection="
                f"altup and model.vwn.dynamic=true (Gemma 3n's streams start as projections of "
                f"the D-wide embedding); allowed: auto, or model.vwn.dynamic=false"
            )

    def embedding(self, vwn) -> str:
        return "projected" if vwn.dynamic else super().embedding(vwn)

    def reduce(self, vwn) -> str:
        return vwn.altup.reduce

    def connection(self, shape, index, dtype, device=None):
        return AltUp(shape.n, shape.hidden, active_block(shape, index), dynamic=shape.dynamic,
                     init_std=shape.init_std, eps=shape.norm_epsilon, dtype=dtype,
                     device=device)

    def layer_params(self, vwn, hidden_size: int) -> int:
        """Static: predict and correct, ``K^2 + K``; dynamic: router norm and weight,
        ``C: K -> K^2``, ``c: K -> K``."""
        k = vwn.n
        if vwn.dynamic:
            return hidden_size + k * hidden_size + k ** 3 + k * k
        return k * k + k

    def layer_flops(self, vwn, hidden_size: int) -> int:
        """Predict ``2K^2 D``, correct ``3KD``; dynamic: two routers, RMSNorm ``4D`` and
        ``2KD`` each."""
        static = 2 * vwn.n * vwn.n * hidden_size + 3 * vwn.n * hidden_size
        router = 2 * (4 * hidden_size + 2 * vwn.n * hidden_size) if vwn.dynamic else 0
        return static + router
