"""SLURM for real: a local cluster of two emulated nodes (``slurm_cluster.py``, the recipe of
PLATFORM.md) runs ``slurm/train.sbatch`` and ``megatron-vwn slurm``:

1. a 2-node job of the tiny config (one torchrun per node, gloo): metrics, layout, checkpoint;
2. a job preempted with USR1 (``scancel --signal=USR1 --batch``, what ``--signal=B:USR1@GRACE``
   sends before the time limit): it saves, exits 0, requeues itself, resumes from its checkpoint
   and finishes with every iteration logged once, row for row equal to the uninterrupted run;
3. ``megatron-vwn slurm sweep tiny --widths 1,2``: both runs finish, same everything but m/n;
4. a rank killed with SIGKILL on the second node: the job fails (not requeued) with a line naming
   the lost rank and the latest checkpoint; a resubmission resumes from it.

The cluster tests skip, saying why, where SLURM cannot run (not installed, not root). The
planning tests at the top need no cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_vwn.cli import main
from megatron_vwn.config.errors import ConfigError
from megatron_vwn.launch.progress import main as progress_main
from megatron_vwn.launch.site import SBATCH_SCRIPT, load_site, sbatch_command
from megatron_vwn.launch.sweep import SweepSpec, plan_sweep, width_to_vwn
from megatron_vwn.training.lifetime import STOP_GRACE_S
from tests.integration.slurm_cluster import LocalCluster, start_cluster, unavailable_reason
from tests.process_guard import survivors

N = 24  # iterations of every cluster run: a few seconds of training per job
COMMON = [f"train.iters={N}", "logging.interval=1", "train.eval_interval=8",
          "train.eval_iters=2", "logging.wandb=off"]
TOKENS_PER_ITER = 16 * 128  # tiny: global batch 16 x sequence 128
JOB_TIMEOUT = 300


# ---- planning, no cluster -------------------------------------------------------------------

def test_width_maps_to_the_papers_m_and_n():
    assert width_to_vwn(1) == (1, 1)
    assert width_to_vwn(1.5) == (2, 3)
    assert [width_to_vwn(w) for w in (2, 4, 8)] == [(8, 16), (8, 32), (8, 64)]
    with pytest.raises(ConfigError, match="must be >= 1"):
        width_to_vwn(0.5)


def test_sweep_dry_run_prints_one_sbatch_per_width_and_writes_nothing(tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", "sweep", "tiny", "--widths", "1,1.5,2,4,8", "--dry-run",
                 "--nodes", "2", "--time", "01:00:00", "--partition", "gpu",
                 "train.iters=50"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "sbatch" in line]
    assert len(lines) == 5
    for line, tag, (m, n) in zip(lines, ["x1", "x1p5", "x2", "x4", "x8"],
                                 [(1, 1), (2, 3), (8, 16), (8, 32), (8, 64)], strict=True):
        assert f"--job-name=tiny-{tag}" in line and f"run.name=tiny-{tag}" in line
        assert f"run.dir=runs/sweeps/tiny/{tag}" in line
        assert f"model.vwn.m={m} model.vwn.n={n}" in line
        assert "--nodes=2" in line and "--time=01:00:00" in line and "--partition=gpu" in line
        assert "--signal=B:USR1@180" in line and "--requeue" in line
        assert f"{SBATCH_SCRIPT} tiny train.iters=50 " in line
    assert not any(tmp_path.iterdir()), "a dry run must not write anything"


def test_sweep_runs_differ_only_in_virtual_width_and_name():
    runs = plan_sweep(SweepSpec(config="tiny", widths=[1, 2, 4], overrides=["train.seed=7"]),
                      world_size=2)
    assert [(r.m, r.n) for r in runs] == [(1, 1), (8, 16), (8, 32)]
    assert [r.name for r in runs] == ["tiny-x1", "tiny-x2", "tiny-x4"]
    assert len({r.run_dir for r in runs}) == 3
    shared = [r.train_args[:2] for r in runs]
    assert shared == [["tiny", "train.seed=7"]] * 3


def test_default_sweep_and_chains(capsys):
    assert main(["slurm", "sweep", "--dry-run", "--chain", "2"]) == 0
    out = capsys.readouterr().out
    assert "gpt_350m at widths 1 (m=1, n=1), 2 (m=8, n=16), 4 (m=8, n=32), 8 (m=8, n=64)" in out
    first, second = [line for line in out.splitlines() if "gpt_350m-vwn-x2" in line][:2]
    assert first.startswith("JOB_gpt_350m_vwn_x2=$(env ")
    assert "--dependency=afterany:$JOB_gpt_350m_vwn_x2 " in second
    assert "MVWN_REQUEUE=0" in second and "--no-requeue" in second  # chains do not requeue


@pytest.mark.parametrize("args, message", [
    (["tiny", "model.vwn.m=4"], "model.vwn.m is set by the sweep"),
    (["tiny", "--widths", "1,0.5"], "must be >= 1"),
    (["tiny", "--nodes", "3"], "global_batch_size"),
])
def test_sweep_refuses_bad_input_before_submitting(args, message, capsys):
    assert main(["slurm", "sweep", *args, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_site_file_then_flags(tmp_path):
    site_file = tmp_path / "site.yaml"
    site_file.write_text("partition: gpu\nnodes: 4\ngpus_per_node: 8\ntime: 24:00:00\n"
                         "container_image: /img.sqsh\ncontainer_mounts: [/data:/data]\n"
                         "env: {NCCL_SOCKET_IFNAME: '^lo,docker'}\n")
    site = load_site(site_file, {"nodes": 2, "account": "proj", "partition": None})
    assert (site.partition, site.nodes, site.account, site.time) == ("gpu", 2, "proj",
                                                                     "24:00:00")
    assert site.world_size == 16
    command = sbatch_command(site, "job", ["tiny"])
    assert "--gpus-per-node=8" in command.argv and "--account=proj" in command.argv
    assert command.env["MVWN_CONTAINER_IMAGE"] == "/img.sqsh"
    assert command.env["MVWN_NPROC_PER_NODE"] == "8"
    assert command.env["MVWN_PYTHON"] == "python"  # inside the container
    assert command.env["NCCL_SOCKET_IFNAME"] == "^lo,docker"
    site_file.write_text("partitoin: gpu\n")
    with pytest.raises(ConfigError, match="unknown site setting 'partitoin'"):
        load_site(site_file)


def test_progress_reports_finished_runs(tmp_path, capsys):
    run = tmp_path / "run"
    assert progress_main(["tiny", f"run.dir={run}", "train.iters=4"]) == 1
    (run / "checkpoints" / "iter_0000002").mkdir(parents=True)
    (run / "checkpoints" / "iter_0000002" / "checkpoint.json").write_text("{}")
    (run / "checkpoints" / "iter_0000004").mkdir()  # incomplete: no manifest
    assert progress_main(["tiny", f"run.dir={run}", "train.iters=4"]) == 1
    (run / "checkpoints" / "iter_0000004" / "checkpoint.json").write_text("{}")
    assert progress_main(["tiny", f"run.dir={run}", "train.iters=4"]) == 0
    assert "finished (checkpoint at iteration 4 of 4)" in capsys.readouterr().out
    assert progress_main(["tiny", "train.nope=1"]) == 2


# ---- the cluster ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    local = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The submission directory of every job (logs/ beside the run directories)."""
    return tmp_path_factory.mktemp("slurm-jobs")


def _submit_script(cluster: LocalCluster, workdir: Path, sbatch_args: list[str],
                   train_args: list[str]) -> str:
    """``sbatch [args] slurm/train.sbatch ARGS`` as a user types it."""
    (workdir / "logs").mkdir(exist_ok=True)
    proc = cluster.run("sbatch", "--parsable", "--output=logs/%x-%j.out", *sbatch_args,
                       str(SBATCH_SCRIPT), *train_args, cwd=workdir,
                       env={"MVWN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    return proc.stdout.strip().split(";")[0]


def _cli(cluster: LocalCluster, workdir: Path, *args: str) -> str:
    proc = cluster.run(sys.executable, "-m", "megatron_vwn", "slurm", *args, cwd=workdir,
                       env={"OMP_NUM_THREADS": "1"}, timeout=120)
    return proc.stdout


def _rows(run_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["split"] == split]


def _log(workdir: Path, job_id: str) -> str:
    (log,) = (workdir / "logs").glob(f"*-{job_id}.out")
    return log.read_text()


def _assert_completed(info: dict, workdir: Path, job_id: str) -> None:
    assert info["JobState"] == "COMPLETED", (info, _log(workdir, job_id)[-6000:])


def _complete_run(run_dir: Path) -> None:
    """Iterations 1..N once each, validation every 8, tokens consistent, a final checkpoint."""
    train = _rows(run_dir)
    assert [row["iteration"] for row in train] == list(range(1, N + 1))
    assert [row["consumed_tokens"] for row in train] == [
        i * TOKENS_PER_ITER for i in range(1, N + 1)]
    assert [row["iteration"] for row in _rows(run_dir, "valid")] == [8, 16, 24]
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 0.5
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == str(N)


@pytest.fixture(scope="module")
def two_node_run(cluster, workdir, data_cache):
    """A 2-node job submitted with plain sbatch; the reference for the preemption test."""
    run_dir = workdir / "two-node"
    job = _submit_script(cluster, workdir, ["--nodes=2", "--job-name=two-node"],
                         ["tiny", *COMMON, f"run.dir={run_dir}", f"data.cache_dir={data_cache}"])
    info = cluster.wait_job(job, JOB_TIMEOUT)
    return job, info, run_dir


@pytest.mark.slow
def test_two_node_job_trains_with_one_rank_per_node(cluster, workdir, two_node_run):
    job, info, run_dir = two_node_run
    _assert_completed(info, workdir, job)
    assert info["NumNodes"] == "2"
    log = _log(workdir, job)
    for node_id, node in enumerate(cluster.nodes):
        assert f"node {node_id} ({node}): torchrun --nnodes=2 --node-rank={node_id}" in log
    assert f"rendezvous {cluster.nodes[0]}:" in log
    assert "world 2 = tensor 1 x pipeline 1 (x virtual 1) x data 2" in log
    assert "training finished" in log
    _complete_run(run_dir)


@pytest.mark.slow
def test_preempted_job_saves_requeues_and_resumes_exactly(cluster, workdir, two_node_run,
                                                          data_cache):
    _, _, reference = two_node_run
    run_dir = workdir / "preempted"
    out = _cli(cluster, workdir, "submit", "tiny", "--nodes", "2", "--log-dir", "logs",
               "--job-name", "preempted", *COMMON, f"run.dir={run_dir}",
               f"data.cache_dir={data_cache}")
    job = re.search(r"submitted job (\d+)", out).group(1)
    # Preempt once training is under way, as --signal=B:USR1@GRACE would before the limit.
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 4):
        assert time.monotonic() < deadline, _log(workdir, job)
        assert cluster.job_info(job)["JobState"] in ("PENDING", "RUNNING"), _log(workdir, job)
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = cluster.wait_job(job, JOB_TIMEOUT)
    _assert_completed(info, workdir, job)
    assert info["Restarts"] == "1", info
    log = _log(workdir, job)  # one log per job: the requeued run appended to it
    assert f"job {job} (preempted) restart 0" in log and f"job {job} (preempted) restart 1" in log
    stopped = int(re.search(r"stopping at iteration (\d+) on SIGUSR1", log).group(1))
    assert 4 <= stopped < N, log[-6000:]
    assert f"requeueing job {job}" in log
    assert (f"resumed from {run_dir / 'checkpoints' / f'iter_{stopped:07d}'} at iteration "
            f"{stopped}") in log
    _complete_run(run_dir)
    assert (run_dir / "checkpoints" / f"iter_{stopped:07d}" / "checkpoint.json").is_file()
    # No lost or repeated step: the same losses as the uninterrupted 2-node run, row for row.
    for split in ("train", "valid"):
        got, want = _rows(run_dir, split), _rows(reference, split)
        assert [r["iteration"] for r in got] == [r["iteration"] for r in want]
        for a, b in zip(got, want, strict=True):
            assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5), (split, a, b)


@pytest.mark.slow
def test_sweep_of_widths_1_and_2_runs_both_jobs(cluster, workdir, two_node_run, data_cache):
    # two_node_run has built the data indices these runs share (same data, iterations, eval).
    out = _cli(cluster, workdir, "sweep", "tiny", "--widths", "1,2", "--nodes", "1",
               "--log-dir", "logs", "--runs-dir", "sweeps", *COMMON,
               f"data.cache_dir={data_cache}")
    manifest = json.loads((workdir / "sweeps" / "tiny" / "sweep.json").read_text())
    jobs = manifest["submissions"][-1]["jobs"]
    assert sorted(jobs) == ["tiny-x1", "tiny-x2"], out
    configs = {}
    for name, (job,) in jobs.items():
        info = cluster.wait_job(job, JOB_TIMEOUT)
        _assert_completed(info, workdir, job)
        assert info["JobName"] == name
        run_dir = workdir / "sweeps" / "tiny" / name.split("-")[-1]
        _complete_run(run_dir)
        configs[name] = yaml.safe_load((run_dir / "config.yaml").read_text())
    x1, x2 = configs["tiny-x1"], configs["tiny-x2"]
    assert (x1["model"]["vwn"]["m"], x1["model"]["vwn"]["n"]) == (1, 1)
    assert (x2["model"]["vwn"]["m"], x2["model"]["vwn"]["n"]) == (8, 16)
    assert (x1["run"]["name"], x2["run"]["name"]) == ("tiny-x1", "tiny-x2")
    for cfg in (x1, x2):
        cfg.pop("run")
        cfg["model"].pop("vwn")
    assert x1 == x2  # same backbone, data, seed, token budget, everything else
    status = _cli(cluster, workdir, "status", "sweeps/tiny")
    for name in ("tiny-x1", "tiny-x2"):
        assert re.search(rf"^{name}\s.*\s{N}\s+{N * TOKENS_PER_ITER}\s", status, re.M), status
    assert f"token budget per run: {N * TOKENS_PER_ITER}" in status


_STUB = """#!/bin/bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
"""


def test_sbatch_script_launches_one_torchrun_per_node_with_the_train_arguments(tmp_path):
    """The batch script run as SLURM would run it, with ``srun``, ``scontrol`` and the python
    replaced by stubs that log their command lines: it asks whether the run is complete, starts
    one task per node running torchrun over ``megatron_vwn.cli train`` with the arguments it was
    given and the rendezvous of the allocation, and stops when the run is complete."""
    subprocess.run(["bash", "-n", str(SBATCH_SCRIPT)], check=True)
    directives = [line.split(None, 1)[1] for line in SBATCH_SCRIPT.read_text().splitlines()
                  if line.startswith("#SBATCH ")]
    assert {"--ntasks-per-node=1", "--signal=B:USR1@180", "--requeue"} <= set(directives)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    stubs = {
        "scontrol": _STUB + 'echo node-a; echo node-b\n',
        # srun: run the node command here, as node 0 of 2 (the args after the srun options).
        "srun": _STUB + 'while [ "$1" != bash ]; do shift; done\n'
                        'SLURM_NODEID=0 SLURM_NNODES=2 "$@"\n',
        # The python: the progress probe says "not complete" first, "complete" after training.
        "python": _STUB + 'if [ "$2" = megatron_vwn.launch.progress ]; then\n'
                          '  [ -e "$STUB_LOG.trained" ] && exit 0; exit 1; fi\n'
                          'touch "$STUB_LOG.trained"\n',
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "MVWN_PYTHON": str(bin_dir / "python"), "SLURM_JOB_ID": "12345",
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_GPUS_ON_NODE": "4", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(SBATCH_SCRIPT), "configs/tiny.yaml", "train.iters=3"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "training finished" in proc.stdout
    calls = log.read_text().splitlines()
    progress = "python -m megatron_vwn.launch.progress configs/tiny.yaml train.iters=3"
    torchrun = ("python -m torch.distributed.run --nnodes=2 --node-rank=0 --nproc-per-node=4 "
                "--master-addr=node-a --master-port=22345 "
                "-m megatron_vwn.cli train configs/tiny.yaml train.iters=3")
    srun = [c for c in calls if c.startswith("srun ")]
    assert len(srun) == 1 and srun[0].startswith(
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpu-bind=none bash -c"), srun
    assert [c for c in calls if c.startswith("python")] == [progress, torchrun, progress]
    assert "scontrol requeue" not in "\n".join(calls)


def _rank_process(job_id: str, rank: int):
    """The training process of ``rank`` in job ``job_id`` (any emulated node: same machine)."""
    import psutil

    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            if env.get("SLURM_JOB_ID") == job_id and env.get("RANK") == str(rank) \
                    and "megatron_vwn.cli" in " ".join(proc.cmdline()):
                return proc
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return None


@pytest.mark.slow
def test_killed_rank_fails_the_job_naming_it_and_a_resubmission_resumes(
        cluster, workdir, two_node_run, data_cache):
    # two_node_run has built the data indices (same data, seed and sample counts are not
    # needed: a longer run builds its own, once).
    run_dir = workdir / "dead-rank"
    common = ["tiny", "logging.interval=1", "train.eval_interval=0", "logging.wandb=off",
              "checkpoint.save_interval=3", "parallel.timeout_s=60", f"run.dir={run_dir}",
              f"data.cache_dir={data_cache}"]
    job = _submit_script(cluster, workdir, ["--nodes=2", "--job-name=dead-rank"],
                         [*common, "train.iters=2000"])
    tracker = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (tracker.is_file() and metrics.is_file()
               and len(metrics.read_text().splitlines()) >= 5):
        assert time.monotonic() < deadline, _log(workdir, job)
        assert cluster.job_info(job)["JobState"] in ("PENDING", "RUNNING"), _log(workdir, job)
        time.sleep(0.2)
    victim = _rank_process(job, 1)
    assert victim is not None, _log(workdir, job)
    victim.kill()  # SIGKILL, on the second node
    killed_at = time.monotonic()
    info = cluster.wait_job(job, 120)  # generous: the job ends within seconds
    assert time.monotonic() - killed_at < 120
    # No process of the failed job is left on either node (ranks, torchrun, forked checkpoint
    # writers): all end within parallel.timeout_s + the stop grace of the kill (reliability.md).
    left = survivors(str(run_dir), within_s=60 + STOP_GRACE_S - (time.monotonic() - killed_at))
    assert left == [], left
    log = _log(workdir, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, log[-6000:])
    assert info.get("Restarts", "0") == "0"  # a failed job is not requeued
    latest = int(tracker.read_text())
    path = run_dir / "checkpoints" / f"iter_{latest:07d}"
    lines = [ln for ln in log.splitlines() if "megatron-vwn: error:" in ln]
    assert any("rank 1 is lost" in ln and f"the latest checkpoint is {path}" in ln
               for ln in lines), log[-6000:]
    assert "training failed (exit status" in log

    job = _submit_script(cluster, workdir, ["--nodes=2", "--job-name=dead-rank-again"],
                         [*common, f"train.iters={latest + 2}"])
    info = cluster.wait_job(job, JOB_TIMEOUT)
    _assert_completed(info, workdir, job)
    assert f"resumed from {path} at iteration {latest}" in _log(workdir, job)
    train = _rows(run_dir)
    assert [row["iteration"] for row in train] == list(range(1, latest + 3))
