"""The run directory contract (``megatron_vwn.runs``) and the one sweep runner
(``megatron_vwn.launch.runner``) given a plan of two runs, in each of its modes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megatron_vwn.config import ConfigError
from megatron_vwn.launch import runner
from megatron_vwn.launch.runner import Launch, run_sweep
from megatron_vwn.launch.site import SITE_ENV, load_site
from megatron_vwn.launch.sweep import SweepSpec, plan_sweep
from megatron_vwn.runs.rows import METRICS_FILE, reached, read_rows, trim_rows
from megatron_vwn.runs.sweeps import (
    SHAPE_MANIFEST,
    WIDTH_MANIFEST,
    read_manifest,
    run_directory,
    write_manifest,
)


def _write_rows(run_dir, rows, tail=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_trim_rows_drops_rows_after_the_checkpoint(tmp_path):
    rows = [{"iteration": i, "split": "train"} for i in range(1, 8)]
    rows.insert(3, {"iteration": 3, "split": "valid"})
    _write_rows(tmp_path, rows, '{"iteration": 8, "spl')
    assert trim_rows(tmp_path, 3) == 5  # iterations 4..7 and the half-written row
    kept = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [(r["iteration"], r["split"]) for r in kept] == [
        (1, "train"), (2, "train"), (3, "train"), (3, "valid")]
    assert trim_rows(tmp_path, 3) == 0
    assert trim_rows(tmp_path / "absent", 3) == 0


def test_read_rows_by_split_skips_a_line_being_written(tmp_path):
    rows = [{"split": "train", "iteration": 1, "lm_loss": 5.0},
            {"split": "valid", "iteration": 1, "lm_loss": 5.5},
            {"split": "analysis", "iteration": 1, "aofe_ratio_wtw": 0.5},
            {"split": "train", "iteration": 2, "lm_loss": 4.0}]
    _write_rows(tmp_path, rows, '{"split": "train", "iter')
    assert read_rows(tmp_path) == rows
    assert [r["iteration"] for r in read_rows(tmp_path, "train")] == [1, 2]
    assert read_rows(tmp_path, "valid") == [rows[1]]
    assert read_rows(tmp_path / "not-started") == []
    assert reached(tmp_path, 2) and not reached(tmp_path, 3)


def test_manifest_round_trip_and_where_its_runs_are(tmp_path, monkeypatch):
    sweep = tmp_path / "sweeps" / "s"
    with pytest.raises(ConfigError, match=f"{WIDTH_MANIFEST} not found: not a sweep directory"):
        read_manifest(sweep, WIDTH_MANIFEST)
    with pytest.raises(ConfigError, match="not a shape sweep directory"):
        read_manifest(sweep, SHAPE_MANIFEST)
    manifest = {"name": "s", "submit_dir": str(tmp_path / "submitted"),
                "runs": [{"name": "s-x1", "run_dir": "sweeps/s/x1"},
                         {"name": "s-x2", "run_dir": str(tmp_path / "elsewhere" / "x2")}]}
    assert write_manifest(sweep, WIDTH_MANIFEST, manifest) == sweep / WIDTH_MANIFEST
    assert read_manifest(sweep, WIDTH_MANIFEST) == manifest
    first, second = manifest["runs"]
    assert run_directory(manifest, second, sweep) == tmp_path / "elsewhere" / "x2"
    # not under the submission directory (the sweep was copied): next to the manifest
    assert run_directory(manifest, first, sweep) == sweep / "x1"
    (tmp_path / "submitted" / "sweeps" / "s" / "x1").mkdir(parents=True)
    assert run_directory(manifest, first, sweep) == tmp_path / "submitted" / "sweeps/s/x1"


@pytest.fixture
def two_runs(tmp_path):
    """A plan of two runs: the backbone and 2x of ``tiny``."""
    return plan_sweep(SweepSpec(config="tiny", widths=[1, 2], runs_dir=str(tmp_path),
                                overrides=["train.iters=3"]))


def _expected_overrides(run):
    return [f"model.vwn.m={run.m}", f"model.vwn.n={run.n}", f"run.dir={run.run_dir}",
            f"run.name={run.name}", "train.iters=3"]


def test_runner_trains_each_run_here_and_skips_finished_ones(two_runs, monkeypatch):
    started = []
    monkeypatch.setattr(runner.subprocess, "call", lambda command: started.append(command) or 0)
    assert run_sweep(two_runs, Launch("local", nproc=2)) == [0, 0]
    assert len(started) == 2
    for command, run in zip(started, two_runs, strict=True):
        assert command[:4] == [sys.executable, "-m", "megatron_vwn", "train"]
        assert command[4:-2] == run.train_args and command[-2:] == ["--nproc", "2"]
        assert all(item in command for item in _expected_overrides(run))
    _write_rows(Path(two_runs[0].run_dir), [{"split": "train", "iteration": 3}])
    started.clear()
    monkeypatch.setattr(runner.subprocess, "call", lambda command: started.append(command) or 7)
    assert run_sweep(two_runs, Launch("local")) == [0, 7]  # the backbone has finished
    assert [command[4:] for command in started] == [two_runs[1].train_args]


def test_runner_submits_or_prints_each_run(two_runs, monkeypatch, capsys):
    monkeypatch.setenv(SITE_ENV, "")
    site = load_site(None, {"partition": "cpu"})
    assert run_sweep(two_runs, Launch("submit", site, chain=1, dry_run=True)) == [0, 0]
    lines = [line for line in capsys.readouterr().out.splitlines() if "sbatch" in line]
    assert len(lines) == 2
    for line, run in zip(lines, two_runs, strict=True):
        assert f"--job-name={run.name}" in line and "--partition=cpu" in line
        assert all(item in line for item in _expected_overrides(run))
        assert run.job_ids == []  # a dry run submits nothing
    assert run_sweep(two_runs, Launch("print")) == [0, 0]
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["megatron-vwn train " + " ".join(run.train_args) for run in two_runs]
