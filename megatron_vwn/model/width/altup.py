"""Alternating updates (AltUp, arXiv 2301.13310; METHODS.md 3): the paper's static variant.

Pure math, no parallelism. ``K`` blocks of width ``D``: the wide state ``H`` is ``[s, b, K*D]``
viewed as ``x``: ``[T, K, D]``. Around the whole transformer layer ``L`` (residual included),
which computes block ``j*`` (``layer mod K``, or 0 with ``selection=same``):

    predict:  x^_i = sum_j p_ij x_j                      p = I + p_delta   [K, K]
    compute:  x~   = L(x_{j*})                                            [T, D]
    correct:  y_i  = x^_i + g_i (x~ - x^_{j*})           g = 1 + g_delta   [K]

``p_delta`` and ``g_delta`` start at 0, so at init ``y_i = x_i`` for ``i != j*`` and
``y_{j*} = L(x_{j*})``; with equal blocks (Recycled-AltUp) every block follows the backbone.
"""

from __future__ import annotations

import torch


class AltUp(torch.nn.Module):
    """One AltUp predict/correct pair around the layer that computes block ``active``.

    Parameters: ``predict_delta`` ``[K, K]`` and ``correct_delta`` ``[K]``, both zero at init
    and tagged ``no_weight_decay`` (like the static coefficients of the other members).
    """

    def __init__(self, blocks: int, hidden: int, active: int,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.blocks, self.hidden, self.active = blocks, hidden, active
        kwargs = dict(dtype=dtype, device=device)
        self.predict_delta = torch.nn.Parameter(torch.zeros(blocks, blocks, **kwargs))
        self.correct_delta = torch.nn.Parameter(torch.zeros(blocks, **kwargs))
        for param in (self.predict_delta, self.correct_delta):
            param.no_weight_decay = True

    def read(self, hidden: torch.Tensor):
        """``[s, b, K*D]`` -> the active block ``x_{j*}`` ``[s, b, D]`` and the prediction."""
        s, b, _ = hidden.shape
        state = hidden.reshape(s * b, self.blocks, self.hidden)  # [T, K, D]
        eye = torch.eye(self.blocks, dtype=state.dtype, device=state.device)
        predict = eye + self.predict_delta.to(state.dtype)
        predicted = torch.matmul(predict, state)  # [T, K, D]: x^_i = sum_j p_ij x_j
        return state[:, self.active].reshape(s, b, self.hidden), predicted

    def write(self, output: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """Layer output ``x~`` ``[s, b, D]`` -> corrected blocks ``[s, b, K*D]``."""
        s, b, _ = output.shape
        innovation = output.reshape(s * b, 1, self.hidden) - predicted[:, self.active:
                                                                        self.active + 1]
        correct = (1.0 + self.correct_delta.to(output.dtype)).view(1, -1, 1)  # [1, K, 1]
        new = torch.addcmul(predicted, correct, innovation)  # [T, K, D]
        return new.reshape(s, b, self.blocks * self.hidden)

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}, hidden={self.hidden}, active={self.active}"
