"""Sweeping the widths of a family member (mHC streams, AltUp blocks) with ``--dry-run``."""

from __future__ import annotations

import pytest

from megatron_vwn.cli import main
from megatron_vwn.config import ConfigError
from megatron_vwn.launch.sweep import SweepSpec, plan_sweep


@pytest.mark.parametrize("config,connection", [("altup/tiny_altup2", "altup"),
                                               ("mhc/tiny_mhc4", "mhc")])
def test_member_sweep_dry_run_prints_one_sbatch_per_stream_count(config, connection, tmp_path,
                                                                  capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", "sweep", config, "--widths", "1,2,4", "--dry-run",
                 "train.iters=5"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "sbatch" in line]
    assert len(lines) == 3
    name = config.split("/")[1]
    for line, k in zip(lines, (1, 2, 4), strict=True):
        assert f"--job-name={name}-x{k}" in line
        assert f"model.vwn.connection={connection} model.vwn.m=1 model.vwn.n={k}" in line
    assert not any(tmp_path.iterdir()), "a dry run must not write anything"


def test_member_sweep_holds_everything_else_equal_and_refuses_fractions():
    runs = plan_sweep(SweepSpec(config="altup/tiny_recycled2", widths=[1, 2, 4]))
    assert [(run.m, run.n) for run in runs] == [(1, 1), (1, 2), (1, 4)]
    with pytest.raises(ConfigError, match="model.vwn.connection=mhc must be a whole number"):
        plan_sweep(SweepSpec(config="mhc/tiny_mhc4", widths=[1.5]))
    # A VWN config still sweeps the paper's (m, n).
    assert [(r.m, r.n) for r in plan_sweep(SweepSpec(config="tiny", widths=[2]))] == [(8, 16)]
