"""``shape report`` on a fixture sweep whose metrics are built from a known power law."""

from __future__ import annotations

import json

import pytest

from megatron_vwn.studies.shape_report import (
    collect,
    fit_power_law,
    seed_stability,
    spearman,
    summarize,
    write_report,
)

A, B = 0.9, -1.8
DEPTHS = {1_000_000: [(2, 192), (4, 128), (8, 96), (16, 64)],
          3_000_000: [(2, 320), (6, 224), (12, 160)]}
BEST = {1_000_000: 4, 3_000_000: 6}


def _wtw(budget: int, depth: int, seed: int) -> float:
    """Largest (so lowest loss) at each budget's best depth; seeds shift it slightly."""
    base = 0.2 if depth == BEST[budget] else 0.05 + 0.01 * depth / 16
    return base + 0.001 * seed


def _fixture(root):
    runs = []
    for budget, shapes in DEPTHS.items():
        for depth, hidden in shapes:
            for seed in (1, 2):
                run_dir = root / f"b{budget}-L{depth}-s{seed}"
                run_dir.mkdir()
                wtw = _wtw(budget, depth, seed)
                rows = [{"split": "train", "iteration": 10, "lm_loss": 9.0},
                        {"split": "analysis", "iteration": 5, "aofe_ratio_wtw": wtw / 2,
                         "aofe_ratio_agop": 0.3},
                        {"split": "valid", "iteration": 5, "lm_loss": 9.0},
                        {"split": "analysis", "iteration": 10, "aofe_ratio_wtw": wtw,
                         "aofe_ratio_agop": 0.4},
                        {"split": "valid", "iteration": 10, "lm_loss": A * wtw ** B}]
                (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                               for r in rows))
                r_dw = depth / hidden
                runs.append({"name": f"s-{budget}-{depth}-{seed}", "budget": budget,
                             "seed": seed, "run_dir": str(run_dir), "train_args": [],
                             "shape": {"depth": depth, "hidden": hidden, "params": budget - 1,
                                       "r_dw": r_dw, "in_interval": 0.023 <= r_dw <= 0.047}})
    manifest = {"kind": "shape", "name": "fixture", "config": "tiny", "overrides": [],
                "count": "embedding", "seeds": 2, "token_budget": 1000, "runs": runs}
    (root / "shape_sweep.json").write_text(json.dumps(manifest))
    return root


def test_power_law_fit_recovers_known_law():
    xs = [0.05, 0.1, 0.2, 0.4]
    fit = fit_power_law(xs, [A * x ** B for x in xs])
    assert fit.a == pytest.approx(A) and fit.b == pytest.approx(B) and fit.r2 == pytest.approx(1)
    noise = [1.1, 0.9, 1.1, 0.9]
    noisy = fit_power_law(xs, [A * x ** B * f for x, f in zip(xs, noise, strict=True)])
    assert noisy.r2 < 0.999
    assert fit_power_law([0.1, 0.2], [1.0, 2.0]) is None


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)


def test_collect_and_summarize_fixture(tmp_path):
    manifest, results = collect(_fixture(tmp_path))
    assert len(results) == 14
    r = next(x for x in results if x.budget == 1_000_000 and x.depth == 4 and x.seed == 1)
    assert r.valid_loss == pytest.approx(A * 0.201 ** B) and r.aofe_ratio_wtw == 0.201
    assert [row["iteration"] for row in r.analysis] == [5, 10]
    budgets = summarize(results)
    for budget, shapes in budgets.items():
        assert [s.r_dw for s in shapes] == sorted(s.r_dw for s in shapes)
        assert min(shapes, key=lambda s: s.loss).depth == BEST[budget]
        stability = seed_stability(results, budget)
        assert stability["same_best"] and stability["spearman"] == pytest.approx(1)


def test_report_files_and_known_fit(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    out = write_report(_fixture(sweep), tmp_path / "out")
    for name in ("loss_vs_rdw.png", "loss_vs_aofe_wtw.png", "aofe_over_training.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    text = (out / "report.md").read_text()
    assert f"`loss = {A:.4g} * ratio^{B:.3f}`, R^2 = 1.000" in text
    assert "- 1M: L=4, D=128, R_DW 0.0312" in text and "inside the NIL interval" in text
    assert "- 3M: L=6, D=224, R_DW 0.0268" in text
    assert text.count("**best**") == 2
    assert "(the same)" in text
