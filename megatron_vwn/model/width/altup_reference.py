"""AltUp straight from its equations in plain torch (docs/width_family.md; docs/methods.md §3).

Self-contained (torch only): ``megatron-vwn convert hf`` copies this file beside the exported
``modeling_vwn.py``, whose ``VWNForCausalLM`` builds its AltUp modules from
:class:`AltUpReference`; the training module (``altup.py``) shares :func:`rms_matched` and is
checked against :class:`AltUpReference` by the unit tests. ``m = 1``, ``K = n`` blocks of ``D``
around the whole layer ``L`` (residual included), which computes block ``j*``:

    static:  x^ = (I + P) x;  y_i = x^_i + (1 + g_i) (L(x_{j*}) - x^_{j*})
    dynamic (Gemma 3n): r(v) = tanh(W_r RMSNorm(v) / D);  x^ = x + reshape(C r(x_{j*})) x;
             x~ = L(x^_{j*});  y_i = x^_i + (1 + (c r(x~))_i) (x~ - x^_{j*})
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_matched(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``x`` rescaled to ``target``'s RMS over the last dim, Gemma 3n's way (the mean square of
    ``x`` clamped at 1e-5)."""
    target_rms = target.float().square().mean(-1, keepdim=True).sqrt()
    rms = x.float().square().mean(-1, keepdim=True).clamp(min=1e-5).sqrt()
    return (x.float() * (target_rms / rms)).to(x.dtype)


class AltUpReference(nn.Module):
    """AltUp's predict / correct around a whole layer computing block ``active``. Static:
    ``predict_delta`` ``[K, K]``, ``correct_delta`` ``[K]``; dynamic (Gemma 3n):
    ``router_norm`` ``[D]``, ``router`` ``[K, D]``, ``predict_coefs`` ``[K^2, K]``,
    ``correct_coefs`` ``[K, K]`` (inference: the training clip of +-120 is not applied)."""

    def __init__(self, blocks: int, hidden: int, active: int, dynamic: bool = False,
                 eps: float = 1e-6):
        super().__init__()
        self.blocks, self.hidden, self.active = blocks, hidden, active
        self.dynamic = dynamic
        self.eps = eps
        if dynamic:
            self.router_norm = nn.Parameter(torch.empty(hidden))
            self.router = nn.Parameter(torch.empty(blocks, hidden))
            self.predict_coefs = nn.Parameter(torch.empty(blocks * blocks, blocks))
            self.correct_coefs = nn.Parameter(torch.empty(blocks, blocks))
        else:
            self.predict_delta = nn.Parameter(torch.empty(blocks, blocks))
            self.correct_delta = nn.Parameter(torch.empty(blocks))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Predict every block as itself and correct with unit gain (zero deltas; a unit router
        norm); a checkpoint or the training module sets the real values."""
        for param in self.parameters(recurse=False):
            param.zero_()
        if self.dynamic:
            self.router_norm.fill_(1.0)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """``tanh(W_r (RMSNorm(x) / D))``: ``[T, D]`` -> ``[T, K]`` (fp32 at least)."""
        compute = torch.promote_types(x.dtype, torch.float32)
        normed = F.rms_norm(x.to(compute), (self.hidden,), self.router_norm.to(compute),
                            self.eps)
        return torch.tanh(F.linear(normed / self.hidden, self.router.to(compute)))

    def read(self, hidden: torch.Tensor):
        """``[..., K*D]`` -> the layer's input ``[..., D]`` and the prediction ``[T, K, D]``."""
        state = hidden.reshape(-1, self.blocks, self.hidden)
        lead = hidden.shape[:-1]
        if self.dynamic:
            modes = self.route(state[:, self.active])
            coefs = F.linear(modes, self.predict_coefs.to(modes.dtype))
            coefs = coefs.view(-1, self.blocks, self.blocks).to(state.dtype)
            predicted = state + torch.matmul(coefs, state)
            return predicted[:, self.active].reshape(*lead, self.hidden), predicted
        eye = torch.eye(self.blocks, dtype=state.dtype, device=state.device)
        predicted = torch.matmul(eye + self.predict_delta.to(state.dtype), state)
        return state[:, self.active].reshape(*lead, self.hidden), predicted

    def write(self, output: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """Layer output ``x~`` ``[..., D]`` -> corrected blocks ``[..., K*D]``."""
        computed = output.reshape(-1, 1, self.hidden)
        innovation = computed - predicted[:, self.active:self.active + 1]
        if self.dynamic:
            modes = self.route(computed[:, 0])
            gain = F.linear(modes, self.correct_coefs.to(modes.dtype))
            correct = (1.0 + gain).to(output.dtype).unsqueeze(-1)
        else:
            correct = (1.0 + self.correct_delta.to(output.dtype)).view(1, -1, 1)
        new = predicted + correct * innovation
        return new.reshape(*output.shape[:-1], self.blocks * self.hidden)


def hf_connection(config, active: int = 0) -> AltUpReference:
    """The module ``VWNForCausalLM`` puts around a whole decoder layer computing block
    ``active``, from its ``VWNConfig``."""
    return AltUpReference(config.vwn_n, config.hidden_size, active, dynamic=config.vwn_dynamic,
                          eps=config.ghc_norm_eps)
