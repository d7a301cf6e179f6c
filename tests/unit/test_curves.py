"""Token speed-up, interpolation, loss gap and the log2(r) fit on curves with known answers."""

from __future__ import annotations

import math

import pytest

from megatron_vwn.studies.curves import Curve, fit_log2, loss_gap, token_speedup, tokens_to_reach


def _linear(speed: float, tokens=(1000, 2000, 3000, 4000)) -> Curve:
    """loss(t) = 4 - 0.0005 * speed * t: ``speed`` times the backbone's progress per token."""
    return Curve([float(t) for t in tokens], [4.0 - 0.0005 * speed * t for t in tokens])


def test_tokens_to_reach_interpolates_between_the_straddling_points():
    curve = Curve([100.0, 200.0, 300.0], [3.0, 2.0, 1.5])
    assert tokens_to_reach(curve, 2.5) == pytest.approx(150.0)
    assert tokens_to_reach(curve, 2.0) == pytest.approx(200.0)
    assert tokens_to_reach(curve, 3.5) == 100.0  # reached at the first point
    assert tokens_to_reach(curve, 1.0) is None
    # the first crossing counts, not a later one after a bump
    assert tokens_to_reach(Curve([1.0, 2.0, 3.0, 4.0], [3.0, 1.0, 2.5, 0.5]), 2.0) == \
        pytest.approx(1.5)


@pytest.mark.parametrize("speed", [1.05, 1.25, 2.0])
def test_speedup_of_a_curve_that_learns_faster_is_that_factor(speed):
    # the backbone ends at 2.0 after 4000 tokens; the run reaches 2.0 at 4000 / speed
    assert token_speedup(_linear(1.0), _linear(speed)) == pytest.approx(speed)


def test_speedup_is_none_when_the_loss_is_not_reached_and_one_for_the_backbone():
    assert token_speedup(_linear(1.0), _linear(0.9)) is None
    assert token_speedup(_linear(1.0), _linear(1.0)) == pytest.approx(1.0)
    assert token_speedup(_linear(1.0), Curve([], [])) is None


def test_loss_gap_is_taken_at_the_run_tokens_inside_the_backbone_range():
    gap = loss_gap(_linear(1.0, (1000, 3000)), _linear(2.0, (1000, 2000, 4000)))
    assert gap.tokens == [1000.0, 2000.0]
    assert gap.loss == pytest.approx([-0.5, -1.0])


def test_fit_recovers_a_known_line_and_reports_r2():
    r = [2, 4, 8]
    fit = fit_log2(r, [-0.0069 * math.log2(x) + 1.6212 for x in r])
    assert (fit.slope, fit.intercept, fit.r2) == pytest.approx((-0.0069, 1.6212, 1.0))
    # by hand: residuals 0.1, -0.2, 0.1 around y = log2 r (SS_res 0.06), SS_tot 0.81+0.04+1.21
    noisy = fit_log2([2, 4, 8], [1.1, 1.8, 3.1])
    assert noisy.slope == pytest.approx(1.0)
    assert noisy.intercept == pytest.approx(0.0, abs=1e-12)
    assert noisy.r2 == pytest.approx(1 - 0.06 / 2.06)
    assert fit_log2([2, 2], [1.0, 1.1]) is None


def test_curve_refuses_unordered_tokens():
    with pytest.raises(ValueError, match="increase"):
        Curve([2.0, 1.0], [1.0, 2.0])
