"""``megatron-vwn shape`` as a user runs it: plan as JSON, a sweep's sbatch lines (dry run), and a
``--local`` sweep of two tiny shapes for a few iterations, then its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_vwn.cli import main

SMALL = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.seq_length=32"]


def test_plan_json(capsys):
    assert main(["shape", "plan", "--params", "800k", "--depths", "1,2,4", "--json", "tiny",
                 *SMALL, "model.vwn.m=2", "model.vwn.n=4"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["budget"] == 800_000 and plan["interval"] == [0.023, 0.047]
    assert "virtual width ghc (m=2, n=4)" in plan["vwn"]
    assert [s["depth"] for s in plan["shapes"]] == [1, 2, 4]
    for shape in plan["shapes"]:
        assert shape["params"] <= 800_000 and shape["hidden"] % 32 == 0
        assert shape["r_dw"] == pytest.approx(shape["depth"] / shape["hidden"])
        assert f"model.hidden_size={shape['hidden']}" in shape["overrides"]


def test_sweep_dry_run_prints_one_sbatch_line_per_run(capsys, tmp_path):
    runs_dir = tmp_path / "runs"
    assert main(["shape", "sweep", "--params", "700k,900k", "--depths", "1,2", "--seeds", "2",
                 "--submit", "--dry-run", "--partition", "cpu", "--time", "00:30:00",
                 "--runs-dir", str(runs_dir), "--name", "dry", "tiny", *SMALL,
                 "train.iters=20"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "sbatch" in line]
    assert len(lines) == 2 * 2 * 2
    for line in lines:
        assert "--partition=cpu" in line and "--time=00:30:00" in line
        assert "slurm/train.sbatch tiny" in line and "analysis.interaction_interval=2" in line
    assert sum("train.seed=1234" in line for line in lines) == 4
    assert sum("train.seed=1235" in line for line in lines) == 4
    assert f"run.dir={runs_dir}/dry/p700k-L1-s1234" in out
    assert not runs_dir.exists()  # a dry run writes nothing


@pytest.mark.parametrize("argv,message", [
    (["--local", "train.seed=3"], "train.seed is set by the shape sweep for every run"),
    (["--dry-run"], "--dry-run prints sbatch lines: use it with --submit"),
    (["--seeds", "0"], "--seeds (0) must be >= 1"),
])
def test_sweep_refusals(capsys, argv, message):
    assert main(["shape", "sweep", "--params", "700k", "--depths", "1", *argv]) == 2
    assert message in capsys.readouterr().err


def test_local_sweep_of_two_shapes_then_report(tmp_path, data_cache):
    runs_dir = tmp_path / "runs"
    # No launcher variables: an in-process test before this one may have left MASTER_PORT etc.
    launcher = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    sweep = [sys.executable, "-m", "megatron_vwn", "shape", "sweep", "--params", "700k",
             "--depths", "1,2", "--local", "--runs-dir", str(runs_dir), "--name", "two",
             "tiny", *SMALL, "train.iters=2", "train.micro_batch_size=2",
             "train.global_batch_size=4", "train.warmup_iters=0", "train.eval_interval=2",
             "train.eval_iters=1", "logging.wandb=off", "logging.interval=1",
             "analysis.probes=4", f"data.cache_dir={data_cache}", "data.split=90,10,0"]
    proc = subprocess.run(sweep, env=env, capture_output=True, text=True, timeout=900,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2/2 runs finished" in proc.stdout
    directory = runs_dir / "two"
    manifest = json.loads((directory / "shape_sweep.json").read_text())
    assert manifest["mode"] == "local" and len(manifest["runs"]) == 2
    for run in manifest["runs"]:
        rows = [json.loads(line) for line in open(os.path.join(run["run_dir"], "metrics.jsonl"))]
        analysis = [r for r in rows if r["split"] == "analysis"]
        # interaction_interval = max(1, iters // 10) = 1: after iterations 1 and 2
        assert [r["iteration"] for r in analysis] == [1, 2]
        assert all(0 < r["aofe_ratio_agop"] < 1 and 0 < r["aofe_ratio_wtw"] < 1
                   for r in analysis)
        assert analysis[-1]["analysis_sequences"] == 4 and analysis[-1]["analysis_probes"] == 4
        assert [r["iteration"] for r in rows if r["split"] == "valid"] == [2]
    again = subprocess.run(sweep, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0
    assert (again.stdout + again.stderr).count("finished already, skipped") == 2

    report = subprocess.run([sys.executable, "-m", "megatron_vwn", "shape", "report",
                             str(directory)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    text = (directory / "report" / "report.md").read_text()
    assert text.count("| 700k |") == 2 and "Best shape per budget" in text
    for name in ("loss_vs_rdw.png", "loss_vs_aofe_wtw.png", "aofe_over_training.png"):
        assert (directory / "report" / name).stat().st_size > 10_000
