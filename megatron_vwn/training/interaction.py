"""The neural-interaction metrics of the depth-width law (docs/methods.md §4), as math.

Both metrics measure how much a square matrix ``M`` lives off its diagonal:

    AOFE(M) = ||M||_F^2 - ||diag M||^2          AOFE_ratio(M) = AOFE(M) / ||M||_F^2

* **AGOP** (gradient space): ``M = E_x[J_P J_P^T]``, ``probes x probes``, where ``J`` is the
  Jacobian of the last position's logits (``V``) w.r.t. the flattened input embeddings
  (``s x d``) of one sequence ``x``, and ``P`` a fixed random ``probes x V`` projection with
  ``N(0, 1) / sqrt(probes)`` entries (its own seed). Row ``i`` of ``J_P = P J`` is the gradient
  of ``<P_i, logits_last>`` w.r.t. the embeddings: one backward pass per row gives ``J_P``
  exactly (the NIL code estimates the same matrix with JVP probes).
* **W^T W** (parameter space): ``M = W^T W / V`` of the ``V x d`` token table ``W``.

``V`` is the tokenizer's vocabulary: the padding rows tensor parallelism adds (whose number
depends on the layout) are no tokens and are left out of both. Everything here is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def projection(vocab_size: int, probes: int, seed: int) -> torch.Tensor:
    """The fixed logit projection ``P``: ``[probes, vocab_size]``, ``N(0, 1) / sqrt(probes)``,
    drawn on the CPU from its own generator so every rank and layout draws the same matrix."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(probes, vocab_size, generator=generator, dtype=torch.float64) \
        / probes ** 0.5


def agop_sum(rows: torch.Tensor) -> torch.Tensor:
    """``sum_x J_P(x) J_P(x)^T`` from Jacobian rows ``[probes, sequences, s * d]`` -> ``[probes,
    probes]`` (float64): the contraction runs over every position and embedding dimension."""
    rows = rows.to(torch.float64)
    return torch.einsum("pbn,qbn->pq", rows, rows)


def wtw(table: torch.Tensor) -> torch.Tensor:
    """``W^T W / V`` of a ``[V, d]`` token table -> ``[d, d]`` (float64)."""
    table = table.to(torch.float64)
    return table.T @ table / table.shape[0]


@dataclass(frozen=True)
class Aofe:
    """Off-diagonal energy of one matrix."""

    aofe: float
    ratio: float


def aofe(matrix: torch.Tensor) -> Aofe:
    """AOFE and AOFE ratio of the symmetrised ``matrix`` (``(M + M^T) / 2``)."""
    matrix = matrix.to(torch.float64)
    matrix = (matrix + matrix.T) / 2
    total = float((matrix * matrix).sum())
    diagonal = float((torch.diagonal(matrix) ** 2).sum())
    off = total - diagonal
    return Aofe(aofe=off, ratio=off / total if total > 0 else 0.0)
