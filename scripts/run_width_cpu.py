#!/usr/bin/env python
"""Run the CPU width-scaling experiment (configs/sweep/width_cpu.yaml) through real SLURM.

Starts the throwaway two-node SLURM cluster the integration tests use
(``tests/integration/slurm_cluster.py``: munge + slurmctld + two ``slurmd -N`` on this host,
one CPU each), submits the three sweeps of docs/width_scaling.md with ``megatron-vwn slurm
sweep`` (backbone and 1.5x-8x; a second seed of 1x and 8x; 1x and 8x with one MTP head), waits
for every job the sweep manifests list, stops the cluster and writes the report. Each job runs
one rank with one thread, so the two nodes share the two cores without oversubscribing them.

Needs root and Debian's slurm-wlm + munge (as the SLURM tests do) and the benchmark corpus::

    python scripts/build_benchmark_corpus.py --out data/benchmark --tokenize --vocab-size 8192
    nohup python scripts/run_width_cpu.py --out docs/results/width_cpu > width_cpu.log 2>&1 &
    # the same on the tiny MoE backbone (configs/sweep/width_cpu_moe.yaml), 1x and 8x, 2 seeds
    nohup python scripts/run_width_cpu.py --sweep sweep/width_cpu_moe --name width-cpu-moe \
        --widths 1,8 --no-mtp --out docs/results/width_cpu_moe > width_cpu_moe.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from slurm_cluster import FINAL_STATES, start_cluster, unavailable_reason  # noqa: E402

RUNS_DIR = REPO / "runs" / "sweeps"


def sweeps(name: str, widths: str | None, mtp: bool) -> list[tuple[str, list[str]]]:
    """The sweeps of one experiment: every width of the sweep file (or ``widths``); a second
    seed of 1x and 8x; 1x and 8x with one MTP head (unless ``mtp`` is off)."""
    runs = [(name, ["--widths", widths] if widths else []),
            (f"{name}-seed2", ["--widths", "1,8", "train.seed=4321"])]
    if mtp:
        runs.append((f"{name}-mtp", ["--widths", "1,8", "model.mtp.num_layers=1"]))
    return runs


def submit(cluster, sweep: str, name: str, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "megatron_vwn", "slurm", "sweep", sweep,
           "--nodes", "1", "--name", name, *extra]
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = cluster.run(*cmd, env=env, cwd=REPO, timeout=300)
    print(proc.stdout, end="", flush=True)
    manifest = json.loads((RUNS_DIR / name / "sweep.json").read_text())
    return [job for ids in manifest["submissions"][-1]["jobs"].values() for job in ids]


def wait_all(cluster, job_ids: list[str], poll_s: float = 30.0) -> dict[str, str]:
    states: dict[str, str] = {}
    while True:
        for job in job_ids:
            if states.get(job) not in FINAL_STATES:
                states[job] = cluster.job_info(job).get("JobState", "?")
        print(f"[{time.strftime('%H:%M:%S')}] " + " ".join(f"{j}:{s}" for j, s in states.items()),
              flush=True)
        if all(s in FINAL_STATES for s in states.values()):
            return states
        time.sleep(poll_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/width_cpu", help="report directory")
    parser.add_argument("--sweep", default="sweep/width_cpu", help="the sweep file")
    parser.add_argument("--name", default="width-cpu", help="name of the first sweep")
    parser.add_argument("--widths", default=None, help="widths of the first sweep (default: "
                        "the sweep file's)")
    parser.add_argument("--no-mtp", action="store_true", help="skip the 1x/8x MTP sweep")
    ns = parser.parse_args()
    experiment = sweeps(ns.name, ns.widths, mtp=not ns.no_mtp)
    reason = unavailable_reason()
    if reason:
        print(f"run_width_cpu: {reason}", file=sys.stderr)
        return 2
    if not (REPO / "data" / "benchmark" / "benchmark.bin").is_file():
        print("run_width_cpu: build the benchmark corpus first (see the docstring)",
              file=sys.stderr)
        return 2
    started = time.time()
    cluster = start_cluster(Path(tempfile.mkdtemp(prefix="mvwn-width-cpu-")))
    try:
        jobs = [job for name, extra in experiment
                for job in submit(cluster, ns.sweep, name, extra)]
        states = wait_all(cluster, jobs)
    finally:
        cluster.stop()
    print(f"all jobs ended after {time.time() - started:.0f} s: {states}", flush=True)
    report = [sys.executable, "-m", "megatron_vwn", "report",
              *(str(RUNS_DIR / name) for name, _ in experiment), "--out", ns.out]
    subprocess.run(report, check=True, cwd=REPO, env={**os.environ})
    return 0 if all(s == "COMPLETED" for s in states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
