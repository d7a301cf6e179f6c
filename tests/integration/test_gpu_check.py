"""The device check (``scripts/gpu_check.py``, docs/gpu.md) is ready to spend a lent GPU's
15 minutes: each part fits one 5-minute call, what it carries fits the tool's 64 MiB, and both
parts run end to end at toy size on CPU, so the script cannot rot between loans."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # dataclasses
_spec.loader.exec_module(gpu_check)

MOE = (ROOT / "configs" / "moe" / "tiny.yaml").is_file()


def _script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _dry_run(*args: str) -> dict[str, dict[str, int]]:
    proc = _script("--dry-run", *args)
    assert proc.returncode == 0, proc.stderr
    parts: dict[str, dict[str, int]] = {}
    for line in proc.stdout.splitlines():
        if m := re.match(r"part (\w+):", line):
            part = parts.setdefault(m.group(1), {})
        elif m := re.match(r"  (\w+) +(\d+) s  \S", line):
            part[m.group(1)] = int(m.group(2))
    return parts


def test_dry_run_prints_every_step_and_each_part_fits_one_call():
    parts = _dry_run()
    assert list(parts) == ["check", "width"]
    assert list(parts["check"]) == ["install_wheels", "environment", "kernels_bf16", "gpu_tests",
                                    "triton_warm", "bench_vwn_torch", "bench_vwn_triton",
                                    "backbone_1b", "moe_step", "ckpt_async_resume"]
    assert list(parts["width"]) == ["install_wheels", "environment", "size_probe",
                                    "triton_warm", "dense_x1", "dense_x2", "dense_x4", "dense_x8",
                                    "moe_x1", "moe_x8", "report"]
    for part, limits in parts.items():
        assert sum(limits.values()) <= gpu_check.STEP_BUDGET_S < 300, (part, limits)
        assert gpu_check.CALL_S <= 300
    assert set(_dry_run("--cpu-smoke")) == {"check", "width"}


def test_wheelhouse_corpus_and_tree_fit_the_carry_limit():
    """Built sizes where built (build_wheelhouse.sh needs PyPI, the corpus pip and npm: not in
    CI), else the sizes recorded when they were built; built ones must match the record."""
    wheelhouse = ROOT / "wheelhouse"
    sizes = gpu_check.carry_bytes(wheelhouse)
    total = sum(size for size, _ in sizes.values())
    assert total < gpu_check.CARRY_LIMIT, sizes
    for name in ("wheelhouse", "corpus"):
        size, how = sizes[name]
        if how == "built":
            recorded = gpu_check.RECORDED_BYTES[name]
            assert abs(size - recorded) <= 0.1 * recorded, (name, size, recorded)
    calls = gpu_check.device_calls(wheelhouse)
    assert calls["width"]["carry"] == ["wheelhouse", *gpu_check.CORPUS_FILES]
    assert all(len(c["carry"]) <= 8 and c["timeout_s"] <= 300 for c in calls.values())


def test_cpu_smoke_runs_both_parts_and_writes_four_files(tmp_path):
    proc = _script("--cpu-smoke", "--out", str(tmp_path), timeout=900)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu_check.md", "gpu_check.tar.gz", "gpu_width.md", "gpu_width.tar.gz"], proc.stdout
    check = (tmp_path / "gpu_check.md").read_text()
    width = (tmp_path / "gpu_width.md").read_text()
    assert proc.returncode == 0, check + width + proc.stdout[-3000:] + proc.stderr[-3000:]
    skipped_moe = "ok" if MOE else gpu_check.MOE_MISSING
    for report, steps in ((check, parts_of("check")), (width, parts_of("width"))):
        for step in steps:
            expected = ("skipped: the current environment (--cpu-smoke)"
                        if step == "install_wheels" else
                        skipped_moe if step.startswith("moe") else "ok")
            assert re.search(rf"\| {step} \| \d+ \| {re.escape(expected)} \|", report), step
    assert "bit-exact" in check and "| triton | 8x (8,64) |" in check
    assert re.search(r"\| x8 \| 8 \| 8 \| 64 \|", width)
    assert "Every dense run trained the same" in width
    with tarfile.open(tmp_path / "gpu_width.tar.gz") as tar:
        names = tar.getnames()
    assert {"gpu_width/width.log", "gpu_width/plan.json", "gpu_width/runs/x8/metrics.jsonl",
            "gpu_width/report/dense/loss_vs_tokens.png"} <= set(names)
    assert not any("/checkpoints" in n for n in names)


def parts_of(part: str) -> list[str]:
    return [s.name for s in gpu_check.PARTS[part](gpu_check.Ctx(True, Path("/w"), Path("/wh")))]


def test_a_failed_or_timed_out_step_is_reported_and_the_rest_runs(tmp_path, monkeypatch):
    py = sys.executable
    steps = [gpu_check.Step("fails", 30, [py, "-c", "raise SystemExit(3)"]),
             gpu_check.Step("hangs", 1, [py, "-c", "import time; time.sleep(60)"]),
             gpu_check.Step("runs", 30, [py, "-c", "print('{\"x\": 1}')"])]
    monkeypatch.setitem(gpu_check.PARTS, "check", lambda c: steps)
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    assert not gpu_check.run_part("check", gpu_check.Ctx(True, work, tmp_path), out)
    report = (out / "gpu_check.md").read_text()
    assert "| fails | 30 | FAILED (rc 3) |" in report
    assert "| hangs | 1 | TIMEOUT (1 s) |" in report
    assert "| runs | 30 | ok |" in report
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        assert "gpu_check/check.log" in tar.getnames()
