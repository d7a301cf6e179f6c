"""The benchmark scripts still run end to end on a tiny shape and print every row they promise.

Timings are not asserted (tests never judge speed); the activation-memory column is exact, so
its ordering is: a wider residual stream saves more for backward, recompute saves less, the
``ghc`` mode least.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_vwn_reports_step_layer_and_memory_rows():
    out = _run("bench_vwn.py", "--hidden", "128", "--seq", "32", "--vocab", "128",
               "--rounds", "1", "--steps", "1", "--layer-reps", "1", "--markdown",
               "--variants", "backbone", "2x (8,16)", "8x (8,64)",
               "8x (8,64) recompute=coefficients", "8x (8,64) recompute=ghc")
    rows = [line.split("|")[1:-1] for line in out.splitlines()
            if re.match(r"\| 128 \|", line)]
    names = ["backbone", "2x (8,16)", "8x (8,64)", "8x (8,64) recompute=coefficients",
             "8x (8,64) recompute=ghc"]
    assert [r[1].strip() for r in rows] == names
    saved = {r[1].strip(): float(r[8]) for r in rows}
    assert float(rows[0][4]) == 1.0 and float(rows[0][6]) == 1.0  # ratios to the backbone
    assert [r[7].strip() != "" for r in rows] == [False, False, False, True, True]  # time cost
    assert saved["backbone"] < saved["2x (8,16)"] < saved["8x (8,64)"]
    assert (saved["8x (8,64) recompute=ghc"] < saved["8x (8,64) recompute=coefficients"]
            < saved["8x (8,64)"])


def test_bench_vwn_json_lines():
    out = _run("bench_vwn.py", "--hidden", "64", "--seq", "16", "--vocab", "64", "--layers", "1",
               "--rounds", "1", "--steps", "1", "--layer-reps", "1", "--json", "--kernel", "torch",
               "--variants", "backbone", "8x (8,64)", "8x (8,64) recompute=ghc",
               "backbone recompute=full", "8x (8,64) recompute=full")
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["variant"] for r in rows] == ["backbone", "8x (8,64)", "8x (8,64) recompute=ghc",
                                            "backbone recompute=full", "8x (8,64) recompute=full"]
    for r in rows:
        assert {"variant", "m", "n", "hidden", "step_ratio", "layer_ratio",
                "activation_ratio", "recompute", "kernel"} <= r.keys()
        assert r["hidden"] == 64
    assert (rows[1]["m"], rows[1]["n"], rows[2]["recompute"]) == (8, 64, "ghc")
    assert rows[0]["activation_ratio"] == 1.0
    assert rows[2]["activation_ratio"] < rows[1]["activation_ratio"]
    # Megatron-Core full recompute keeps only each layer's input: less than without it
    assert [r["train_recompute"] for r in rows] == ["none"] * 3 + ["full"] * 2
    assert rows[3]["activation_ratio"] < 1.0
    assert rows[4]["activation_ratio"] < rows[1]["activation_ratio"]


def test_bench_vwn_over_an_moe_backbone():
    """``--moe 4,2``: the width members over Megatron-Core's MoE layer (docs/moe.md)."""
    out = _run("bench_vwn.py", "--hidden", "64", "--seq", "16", "--vocab", "64", "--layers", "1",
               "--rounds", "1", "--steps", "1", "--layer-reps", "1", "--json", "--kernel", "torch",
               "--moe", "4,2", "--variants", "backbone", "8x (8,64)", "mHC n=4")
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [(r["variant"], r["moe_experts"], r["moe_top_k"]) for r in rows] == [
        ("backbone", 4, 2), ("8x (8,64)", 4, 2), ("mHC n=4", 4, 2)]
    assert rows[0]["step_ratio"] == 1.0 and rows[1]["activation_ratio"] > 1.0


def test_bench_step_prints_one_json_ratio():
    out = _run("bench_step.py", "--layers", "1", "--hidden", "64", "--heads", "4",
               "--groups", "2", "--seq", "32", "--mbs", "1", "--vocab", "128", "--steps", "1",
               "--rounds", "1", "--warmup", "1", "--json")
    result = json.loads(out.strip().splitlines()[-1])
    # The compared runs are the configured ones (our model and the stock one at that shape,
    # fp32 on CPU), both timed, and the ratio is its definition from the printed medians.
    assert {key: result[key] for key in ("layers", "hidden", "seq", "mbs")} == {
        "layers": 1, "hidden": 64, "seq": 32, "mbs": 1}
    if result["device"] == "cpu":
        assert (result["impl"], result["dtype"]) == ("local", "float32")
    for key in ("ours_s", "stock_s"):
        assert math.isfinite(result[key]) and result[key] > 0, result
    assert result["ratio"] == result["ours_s"] / result["stock_s"]


def test_bench_vwn_family_rows_run_the_wide_layer():
    """AltUp and mHC rows probe the layer at the width it carries (K*D, n*D): their saved
    activations grow with K, and the Recycled variant (same layer, replicated table) saves
    as much as AltUp at the same K."""
    family = ["AltUp K=2", "Recycled-AltUp K=2", "AltUp K=4", "dynamic AltUp K=2", "mHC n=4"]
    out = _run("bench_vwn.py", "--hidden", "64", "--seq", "16", "--vocab", "64", "--layers", "1",
               "--rounds", "1", "--steps", "1", "--layer-reps", "1", "--json",
               "--variants", "backbone", *family)
    rows = {r["variant"]: r for r in map(json.loads, out.strip().splitlines())}
    assert list(rows) == ["backbone", *family]
    act = {name: r["activation_ratio"] for name, r in rows.items()}
    assert 1.0 < act["AltUp K=2"] < act["AltUp K=4"]
    assert act["Recycled-AltUp K=2"] == pytest.approx(act["AltUp K=2"], rel=0.05)
    assert act["mHC n=4"] > 1.0
