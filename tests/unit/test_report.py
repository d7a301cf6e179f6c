"""``megatron-vwn report`` on fixture runs whose held-out curves have known speed-ups and whose
final losses lie on a known line in log2(r): summary.json, report.md and the figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_vwn.cli import main
from megatron_vwn.config import dump_config, load_config
from megatron_vwn.launch.sweep import width_to_vwn
from megatron_vwn.model.accounting import flops_per_token
from megatron_vwn.model.builder import padded_vocab_size

TOKENS = [1000, 2000, 3000, 4000]
SLOPE, INTERCEPT = -0.1, 2.0  # final loss = -0.1 log2 r + 2.0


def law_speed(r: float) -> float:
    """The progress-per-token factor that puts a linear curve ``4 - 0.0005 s t`` on the law at
    4000 tokens; it is also the run's token speed-up over the backbone (s = 1)."""
    final = SLOPE * math.log2(r) + INTERCEPT
    return (4.0 - final) / (0.0005 * TOKENS[-1])


def make_run(directory: Path, r: float, speed: float, mtp: int = 0, next2_speed: float = 1.0,
             seed: int = 1234, complete: bool = True) -> Path:
    m, n = width_to_vwn(r)
    cfg = load_config("tiny", [f"model.vwn.m={m}", f"model.vwn.n={n}", f"train.seed={seed}",
                               f"model.mtp.num_layers={mtp}", f"run.name={directory.name}",
                               f"train.iters={len(TOKENS) if complete else 10}",
                               f"run.dir={directory}"])
    directory.mkdir(parents=True)
    dump_config(cfg, directory / "config.yaml")
    with open(directory / "metrics.jsonl", "w") as out:
        for step, tokens in enumerate(TOKENS, start=1):
            out.write(json.dumps({"split": "train", "iteration": step, "consumed_tokens": tokens,
                                  "lm_loss": 9.0}) + "\n")
            row = {"split": "valid", "iteration": step, "consumed_tokens": tokens,
                   "lm_loss": 4.0 - 0.0005 * speed * tokens}
            if mtp:
                row["mtp_loss_1"] = 4.5 - 0.0005 * next2_speed * tokens
            out.write(json.dumps(row) + "\n")
    return directory


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A sweep directory (sweep.json as `slurm sweep` writes it) of r = 1, 2, 4, 8."""
    root = tmp_path / "sweeps" / "law"
    runs = []
    for r in (1, 2, 4, 8):
        tag = f"x{r}"
        make_run(root / tag, r, law_speed(r))
        m, n = width_to_vwn(r)
        runs.append({"width": r, "m": m, "n": n, "name": f"law-{tag}", "run_dir": str(root / tag),
                     "train_args": []})
    (root / "sweep.json").write_text(json.dumps({"name": "law", "submit_dir": str(tmp_path),
                                                 "runs": runs}))
    return root


def test_report_gives_the_known_speedups_and_fit(sweep, tmp_path, capsys):
    mtp_backbone = make_run(tmp_path / "x1-mtp", 1, 1.0, mtp=1, next2_speed=1.0)
    mtp_wide = make_run(tmp_path / "x8-mtp", 8, 1.2, mtp=1, next2_speed=1.3)
    out = tmp_path / "report"
    assert main(["report", str(sweep), str(mtp_backbone), str(mtp_wide), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    runs = {row["name"]: row for row in summary["runs"]}
    assert list(runs) == ["law-x1", "law-x2", "law-x4", "law-x8", "x1-mtp", "x8-mtp"]
    assert summary["baseline"] == "law-x1" and summary["baseline_next2"] == "x1-mtp"
    for r in (1, 2, 4, 8):
        row = runs[f"law-x{r}"]
        assert row["r"] == r
        assert row["token_speedup"] == pytest.approx(law_speed(r), rel=1e-5)
        assert row["final_valid_loss"] == pytest.approx(SLOPE * math.log2(r) + INTERCEPT)
        assert "token_speedup_next2" not in row
    assert runs["x8-mtp"]["token_speedup"] == pytest.approx(1.2, rel=1e-5)
    assert runs["x8-mtp"]["token_speedup_next2"] == pytest.approx(1.3, rel=1e-5)
    assert runs["x1-mtp"]["token_speedup_next2"] == pytest.approx(1.0)
    fit = summary["fit"]  # over r = 2, 4, 8 without MTP
    assert (fit["slope"], fit["intercept"], fit["r2"], fit["points"]) == \
        pytest.approx((SLOPE, INTERCEPT, 1.0, 3))
    cfg = load_config(sweep / "x8" / "config.yaml")
    assert runs["law-x8"]["tokens"] == 4000
    assert runs["law-x8"]["flops"] == 4000 * flops_per_token(
        cfg.model, padded_vocab_size(4096, cfg.model.make_vocab_size_divisible_by, 1))
    for name in ("loss_vs_tokens", "loss_vs_flops", "loss_gap", "loss_vs_log2r"):
        assert (out / f"{name}.png").stat().st_size > 10_000
        assert f"({name}.png)" in (out / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "| law-x8 | 8 | 8 | 64 |" in printed and "-0.1000 log2 r + 2.0000" in printed


def test_a_run_that_never_reaches_the_backbone_loss_has_no_speedup(tmp_path):
    backbone = make_run(tmp_path / "base", 1, 1.0)
    slow = make_run(tmp_path / "slow", 2, 0.9)
    out = tmp_path / "report"
    assert main(["report", str(slow), "--baseline", str(backbone), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    runs = {row["name"]: row for row in summary["runs"]}
    assert runs["slow"]["token_speedup"] is None
    assert summary["fit"]["slope"] is None  # one width r > 1: no line
    assert "| slow | 2 |" in (out / "report.md").read_text()


def test_a_partial_run_is_marked_and_left_out_of_the_fit(sweep, tmp_path):
    """A run that stopped before train.iters (still training, or killed) is reported as partial
    and does not bend the fit: the line over the finished r = 2, 4, 8 stays the law's."""
    partial = make_run(tmp_path / "x16-partial", 16, 0.5, complete=False)
    out = tmp_path / "report"
    assert main(["report", str(sweep), str(partial), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    runs = {row["name"]: row for row in summary["runs"]}
    assert runs["x16-partial"]["complete"] is False and runs["law-x8"]["complete"] is True
    fit = summary["fit"]
    assert (fit["slope"], fit["intercept"], fit["points"]) == pytest.approx((SLOPE, INTERCEPT, 3))
    assert "| 4,000 (partial) |" in (out / "report.md").read_text()


def test_each_seed_is_compared_with_its_own_backbone(tmp_path):
    """Seed 2's backbone learns 1.25x faster than seed 1's: seed 2's 8x run (1.5x faster than
    seed 1's backbone) is 1.2x its own backbone, not 1.5x; --baseline overrides the pairing."""
    runs_in = [make_run(tmp_path / "a-x1", 1, 1.0), make_run(tmp_path / "a-x8", 8, 1.2),
               make_run(tmp_path / "b-x1", 1, 1.25, seed=99),
               make_run(tmp_path / "b-x8", 8, 1.5, seed=99)]
    out = tmp_path / "report"
    assert main(["report", *map(str, runs_in), "--out", str(out)]) == 0
    runs = {row["name"]: row for row in json.loads((out / "summary.json").read_text())["runs"]}
    assert runs["a-x8"]["token_speedup"] == pytest.approx(1.2, rel=1e-5)
    assert runs["b-x8"]["token_speedup"] == pytest.approx(1.2, rel=1e-5)
    assert (runs["a-x8"]["baseline"], runs["b-x8"]["baseline"]) == ("a-x1", "b-x1")
    assert main(["report", *map(str, runs_in), "--baseline", str(runs_in[0]),
                 "--out", str(out)]) == 0
    runs = {row["name"]: row for row in json.loads((out / "summary.json").read_text())["runs"]}
    assert runs["b-x8"]["token_speedup"] == pytest.approx(1.5, rel=1e-5)


def test_report_refuses_a_directory_that_is_no_run(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
