"""Loss curves as numbers: tokens to reach a loss, token speed-up over the backbone, the loss gap,
and the log-linear law of loss in the virtual-width factor ``r``.

A curve is two equal-length sequences, ``tokens`` (increasing) and ``loss``, e.g. the ``valid``
rows of one run. Between logged points the curve is taken as linear in tokens (no smoothing):
with the fixed held-out set (``train.eval_mode=fixed``) consecutive points score the same tokens,
so the only noise left is the training itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise


@dataclass(frozen=True)
class Curve:
    tokens: list[float]
    loss: list[float]

    def __post_init__(self):
        if len(self.tokens) != len(self.loss):
            raise ValueError(f"tokens ({len(self.tokens)}) and loss ({len(self.loss)}) differ "
                             f"in length")
        if any(b <= a for a, b in pairwise(self.tokens)):
            raise ValueError("curve tokens must increase")

    @property
    def final_loss(self) -> float | None:
        return self.loss[-1] if self.loss else None

    def at(self, tokens: float) -> float | None:
        """The loss at ``tokens`` (linear between points; None outside the logged range)."""
        xs, ys = self.tokens, self.loss
        if not xs or tokens < xs[0] or tokens > xs[-1]:
            return None
        for i in range(1, len(xs)):
            if tokens <= xs[i]:
                frac = (tokens - xs[i - 1]) / (xs[i] - xs[i - 1])
                return ys[i - 1] + frac * (ys[i] - ys[i - 1])
        return ys[-1]


def tokens_to_reach(curve: Curve, target: float) -> float | None:
    """The first token count at which ``curve`` reaches ``target`` (loss <= target), linear
    between the two logged points that straddle it; None if it never does."""
    xs, ys = curve.tokens, curve.loss
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if y <= target:
            if i == 0 or ys[i - 1] == y:
                return float(x)
            frac = (ys[i - 1] - target) / (ys[i - 1] - y)
            return xs[i - 1] + frac * (x - xs[i - 1])
    return None


def token_speedup(baseline: Curve, run: Curve) -> float | None:
    """Tokens the backbone needed to reach its final loss / tokens ``run`` needed to reach it.

    Both counts are :func:`tokens_to_reach` on the backbone's final loss (for a backbone whose
    loss only falls, its own count is its final token count). None when ``run`` never gets
    there or either curve is empty.
    """
    target = baseline.final_loss
    if target is None:
        return None
    needed_by_baseline = tokens_to_reach(baseline, target)
    needed_by_run = tokens_to_reach(run, target)
    if needed_by_run is None or not needed_by_run or needed_by_baseline is None:
        return None
    return needed_by_baseline / needed_by_run


def loss_gap(baseline: Curve, run: Curve) -> Curve:
    """``run`` minus ``baseline`` at ``run``'s token counts within the backbone's range."""
    points = [(t, y - baseline.at(t)) for t, y in zip(run.tokens, run.loss, strict=True)
              if baseline.at(t) is not None]
    return Curve([t for t, _ in points], [g for _, g in points])


@dataclass(frozen=True)
class LinearFit:
    """``loss = slope * log2(r) + intercept`` by least squares; ``r2`` its coefficient of
    determination (1.0 for points on the line)."""

    slope: float
    intercept: float
    r2: float
    points: int

    def __call__(self, log2_r: float) -> float:
        return self.slope * log2_r + self.intercept


def fit_log2(r_values: Sequence[float], losses: Sequence[float]) -> LinearFit | None:
    """Least-squares line of ``losses`` against ``log2(r)``; None with fewer than two distinct
    ``r`` (the line is undetermined)."""
    xs = [math.log2(r) for r in r_values]
    ys = list(losses)
    if len(set(xs)) < 2:
        return None
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return LinearFit(slope=slope, intercept=intercept, r2=r2, points=n)
