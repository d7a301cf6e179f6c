#!/usr/bin/env python3
"""The device check in two parts, each one device call of at most 5 minutes (docs/gpu.md).

  python3 scripts/gpu_check.py --part check|width|all [--out DIR] [--wheelhouse DIR]
  python3 scripts/gpu_check.py --dry-run [--cpu-smoke]   # every step, its limit and command
  python3 scripts/gpu_check.py --cpu-smoke [--out DIR]   # both parts at toy size on CPU
  python3 scripts/gpu_check.py --carry                   # what the two calls carry, in bytes

check: install the wheelhouse; the Triton GHC kernels against the torch path in bf16; the
other gpu-marked tests; the bench's kernels compiled into Triton's cache; bench_vwn.py at
D = 2048 in bf16 with the torch and the Triton kernels; tokens/s, TFLOP/s, MFU and peak memory
of a ~1B backbone; one MoE step; an async checkpoint save and exact resume.
width: a width mini-sweep (backbone, 2x, 4x, 8x of a dense model; backbone and 8x of the MoE
model) on the benchmark corpus, every run the same token budget within one epoch, sized from a
throughput probe of the 8x after warm-up; fixed held-out evaluation; ``megatron-vwn report``.

Every step runs in its own process under its own time limit (and under what is left of the
part's budget); a step that fails or runs out of time is reported and the next one runs. Each
part writes PART.md (one line per step, then its results) and PART.tar.gz (logs, JSON,
run metrics, figures) to --out ($OUT if set): four files at most, none in a folder. The exit
status is 1 if a step failed. Standard library only: it runs before the wheelhouse is in place.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = "scripts/gpu_probe.py"
CALL_S = 300
"""One device call per part (timeout_s)."""
STEP_BUDGET_S = 250
"""A part's step limits add up to at most this; the rest of CALL_S is for Python's start, the
report and the archive. The part also stops giving time to steps when this much has passed."""
CARRY_LIMIT = 64 * 2**20
"""What the device tool carries: the tree, shared/ and the carried paths, together."""
CORPUS = "data/benchmark/benchmark"
CORPUS_FILES = [f"{CORPUS}.bin", f"{CORPUS}.idx", "data/benchmark/tokenizer.model"]
RECORDED_BYTES = {"wheelhouse": 2_612_103, "corpus": 14_875_188 + 79_582 + 132_334}
"""Sizes when built (2026-12-06): scripts/build_wheelhouse.sh (megatron-core 0.16.1, cp312) and
scripts/build_benchmark_corpus.py --tokenize --vocab-size 8192 (7,437,594 tokens, uint16).
Used by the carry check where they are not built (CI has no PyPI); checked against them where
they are."""
MOE_CONFIG = ROOT / "configs" / "moe" / "tiny.yaml"
MOE_MISSING = "skipped: moe/tiny not present"


@dataclass
class Step:
    name: str
    limit_s: int
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    skip: str = ""
    """Non-empty: not run, reported with this reason."""


@dataclass
class Result:
    step: Step
    status: str  # ok | FAILED (rc N) | TIMEOUT | skipped: ... | not run: ...
    seconds: float
    output: str

    @property
    def ok(self) -> bool:
        return self.status == "ok" or self.status.startswith("skipped")

    def json(self) -> list[dict]:
        """The JSON objects the step printed, one per line, in order."""
        rows = []
        for line in self.output.splitlines():
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
        return rows


class Ctx:
    """Where a part runs: its work folder, interpreter, sizes (device or CPU smoke)."""

    def __init__(self, smoke: bool, work: Path, wheelhouse: Path):
        self.smoke, self.work, self.wheelhouse = smoke, work, wheelhouse
        self.py = sys.executable
        self.cache = str(work / "data_cache")

    def limit(self, device_s: int, smoke_s: int) -> int:
        return smoke_s if self.smoke else device_s

    def probe(self, *args: str) -> list[str]:
        return [self.py, PROBE, *args]

    def install_step(self) -> Step:
        wheels = sorted(self.wheelhouse.glob("*.whl"))
        step = Step("install_wheels", 10, [
            self.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--no-cache-dir", "--upgrade", "--target", str(self.work / "site"),
            *map(str, wheels)])
        if self.smoke:
            step.skip = "skipped: the current environment (--cpu-smoke)"
        elif not wheels:
            step.skip = (f"not run: no wheels in {self.wheelhouse} (scripts/build_wheelhouse.sh "
                         f"where PyPI is reachable, then carry it)")
        return step


def check_steps(c: Ctx) -> list[Step]:
    pytest = [c.py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu"]
    interpret = {"TRITON_INTERPRET": "1"} if c.smoke else {}
    bench = [c.py, "scripts/bench_vwn.py", "--json", "--variants"]
    bench += (["backbone", "8x (8,64)", "--hidden", "64", "--seq", "8", "--vocab", "128",
               "--layers", "1", "--rounds", "1", "--steps", "1", "--layer-reps", "1"] if c.smoke
              else ["backbone", "2x (8,16)", "8x (8,64)", "8x (8,64) recompute=ghc", "--hidden",
                    "2048", "--seq", "2048", "--mbs", "2", "--precision", "bf16", "--rounds", "3"])
    common = ["logging.wandb=off", "logging.interval=1", "train.eval_interval=0",
              f"data.cache_dir={c.cache}"]
    toy = ["model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=4",
           "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.seq_length=32"]
    if c.smoke:
        big = ["tiny", *toy, "train.micro_batch_size=2", "train.global_batch_size=2",
               "train.iters=4"]
    else:  # 1.1B parameters: gpt_1p3b on one GPU with a 4k vocabulary
        big = ["gpt_1p3b", "parallel.tensor=1", "parallel.sequence_parallel=false",
               "data.tokenizer_vocab_size=4096", "train.micro_batch_size=4",
               "train.global_batch_size=8", "train.iters=10"]
    iters = big[-1].split("=")[1]
    moe = Step("moe_step", c.limit(14, 120), c.probe(
        "train", "--warmup", "0", "moe", "moe/tiny", "train.iters=2", "train.lr_decay_iters=2",
        "train.warmup_iters=1", "model.seq_length=64", "train.micro_batch_size=2",
        "train.global_batch_size=2", *common, f"run.dir={c.work / 'moe'}"),
        skip="" if MOE_CONFIG.is_file() else MOE_MISSING)
    ckpt = ["train.micro_batch_size=4", "train.global_batch_size=8", "train.warmup_iters=2",
            "checkpoint.save_interval=4", *common,
            *(toy if c.smoke else ["model.num_layers=2", "checkpoint.async_save=true"])]
    return [
        c.install_step(),
        Step("environment", c.limit(8, 60), c.probe("env")),
        Step("kernels_bf16", c.limit(42, 120), [*pytest, "-k", "triton and bf16"]),
        Step("gpu_tests", c.limit(28, 120), [*pytest, "-k", "not (triton and bf16)"]),
        Step("triton_warm", c.limit(20, 120), c.probe(
            "warm", "--hidden", "64" if c.smoke else "2048", "--widths", "x2", "x8",
            "--tokens", "16" if c.smoke else "4096"), interpret),  # the bench's seq x mbs
        Step("bench_vwn_torch", c.limit(22, 120), [*bench, "--kernel", "torch"]),
        Step("bench_vwn_triton", c.limit(22, 180), [*bench, "--kernel", "triton"], interpret),
        Step("backbone_1b", c.limit(33, 120), c.probe(
            "train", "--warmup", "3", "~1B backbone", *big, "train.warmup_iters=2",
            f"train.lr_decay_iters={iters}", *common, f"run.dir={c.work / 'backbone_1b'}")),
        moe,
        Step("ckpt_async_resume", c.limit(49, 180),
             c.probe("resume", str(c.work / "ckpt"), *ckpt)),
    ]


def width_steps(c: Ctx) -> list[Step]:
    plan = str(c.work / "plan.json")
    run_limit = c.limit(30, 120)
    if c.smoke:  # the bundled corpus, toy shapes, six iterations
        data = ["data.split=95,5,0"]
        size = ["--ladder", "smoke", "--seq", "32", "--batch", "4", "--eval-iters", "1",
                "--probe-iters", "4", "--probe-warmup", "1", "--max-iters", "6"]
    else:  # 3 held-out batches of 32,768 tokens fit the 105,834 of the validation split
        data = [f"data.paths=[{CORPUS}]", "data.tokenizer_model=data/benchmark/tokenizer.model",
                "data.split=98,2,0"]
        size = ["--ladder", "gpu", "--seq", "512", "--batch", "64", "--eval-iters", "3",
                "--probe-iters", "12", "--probe-warmup", "4"]
    common = [*data, "train.lr=2e-3", "train.min_lr=2e-4", "logging.wandb=off"]
    missing = [] if c.smoke else [f for f in CORPUS_FILES if not (ROOT / f).is_file()]
    moe_limit = c.limit(16, 120)
    if MOE_CONFIG.is_file():
        size += ["--moe-config", "moe/tiny", "--moe-limit", str(moe_limit)]
    steps = [
        c.install_step(),
        Step("environment", c.limit(10, 60), c.probe("env")),
        Step("size_probe", c.limit(45, 180), c.probe(
            "size", plan, *size, "--run-limit", str(run_limit), "--cache", c.cache,
            "--common", *common),
            skip=f"not run: {', '.join(missing)} missing (scripts/build_benchmark_corpus.py "
                 f"--out data/benchmark --tokenize --vocab-size 8192, then carry them)"
            if missing else ""),
        Step("triton_warm", c.limit(17, 120), c.probe(
            "warm", "--plan", plan, "--widths", "x2", "x4", "x8", "--tokens",
            "16" if c.smoke else "256"), {"TRITON_INTERPRET": "1"} if c.smoke else {}),
    ]
    steps += [Step(f"dense_{w}", run_limit, c.probe("width", plan, w))
              for w in ("x1", "x2", "x4", "x8")]
    steps += [Step(f"moe_{w}", moe_limit, c.probe("width", plan, f"moe_{w}",
                                                         "--config", "moe/tiny"),
                   skip="" if MOE_CONFIG.is_file() else MOE_MISSING) for w in ("x1", "x8")]
    steps.append(Step("report", c.limit(12, 60), c.probe("report", str(c.work))))
    return steps


PARTS = {"check": check_steps, "width": width_steps}


def run_step(step: Step, env: dict[str, str], deadline: float, log) -> Result:
    log.write(f"=== {step.name} (limit {step.limit_s} s): {shlex.join(step.argv)}\n")
    if step.skip:
        log.write(step.skip + "\n")
        return Result(step, step.skip, 0.0, "")
    left = deadline - time.monotonic()
    if left < 1:
        return Result(step, "not run: the part's time budget is spent", 0.0, "")
    limit = min(step.limit_s, left)
    started = time.monotonic()
    proc = subprocess.Popen(step.argv, cwd=ROOT, env={**env, **step.env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else f"FAILED (rc {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the step and whatever it started
        output, _ = proc.communicate()
        status = f"TIMEOUT ({limit:.0f} s)"
    log.write(output)
    return Result(step, status, time.monotonic() - started, output)


def step_env(c: Ctx) -> dict[str, str]:
    # The tree first: megatron-vwn runs from it (its configs/ live beside the package).
    path = [str(ROOT), str(c.work / "site"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4"),
            "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def run_part(part: str, c: Ctx, out: Path) -> bool:
    steps = PARTS[part](c)
    deadline = time.monotonic() + STEP_BUDGET_S * (4 if c.smoke else 1)
    results = []
    with (c.work / f"{part}.log").open("w") as log:
        for step in steps:
            result = run_step(step, step_env(c), deadline, log)
            log.flush()
            print(f"{part}/{step.name}: {result.status} ({result.seconds:.0f} s)", flush=True)
            results.append(result)
    (out / f"gpu_{part}.md").write_text(REPORTS[part](results, c))
    with tarfile.open(out / f"gpu_{part}.tar.gz", "w:gz") as tar:
        for path in sorted(c.work.iterdir()):
            if path.name not in ("site", "data_cache"):
                tar.add(path, arcname=f"gpu_{part}/{path.name}", filter=_no_checkpoints)
    return all(r.ok for r in results)


def _no_checkpoints(info: tarfile.TarInfo):
    return None if "/checkpoints" in info.name else info  # tens of MB, not results


# --- the reports --------------------------------------------------------------------------------
def _header(title: str, results: list[Result], c: Ctx) -> list[str]:
    env = next((r.json()[-1] for r in results if r.step.name == "environment" and r.json()), {})
    lines = [f"## {title}, {datetime.date.today().isoformat()}: {env.get('device', '?')}", ""]
    if env:
        lines += [f"torch {env['torch']} (CUDA {env['cuda']}), Triton {env['triton']}, "
                  f"Megatron-Core {env['megatron_core']}, Transformer Engine "
                  f"{env['transformer_engine']}, Python {env['python']}.", ""]
    if c.smoke:
        lines += ["*CPU smoke run (`--cpu-smoke`): toy sizes, the figures mean nothing.*", ""]
    lines += ["| step | limit (s) | status | seconds | result |", "|---|---|---|---|---|"]
    lines += [f"| {r.step.name} | {r.step.limit_s} | {r.status} | {r.seconds:.0f} | "
              f"{SUMMARIES.get(r.step.name, _last_line)(r)} |" for r in results]
    return lines + [""]


def _last_line(r: Result) -> str:
    if r.json() or r.status == "ok" or not r.output.strip():
        return ""
    return "`" + r.output.strip().splitlines()[-1][:160].replace("|", "/") + "`"


def _pytest(r: Result) -> str:
    tail = [x for x in r.output.splitlines() if " passed" in x or " failed" in x
            or " skipped" in x or " deselected" in x]
    return tail[-1].strip("= ") if tail else _last_line(r)


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _bench(r: Result) -> str:
    rows = {row["variant"]: row for row in r.json()}
    row = rows.get("8x (8,64)")
    if not row:
        return _last_line(r)
    goal = "" if row["kernel"] != "triton" else \
        f" (goal <= 1.12: {'met' if row['layer_ratio'] <= 1.12 else 'missed'})"
    return f"8x (8,64) layer ratio {_fmt(row['layer_ratio'])}{goal}, step {_fmt(row['step_ratio'])}"


def _train(r: Result) -> str:
    if not r.json():
        return _last_line(r)
    t = r.json()[-1]
    return (f"{t['params'] / 1e9:.2f}B params: {t['tokens_per_s']:.0f} tokens/s, "
            f"{t['tflops_per_s']:.1f} TFLOP/s, MFU {_fmt(t['mfu'], '.1%')} (goal "
            f"{t['mfu_goal']:.0%}, no gate), peak {_fmt(t['peak_memory_GB'], '.1f')} GB")


def _moe(r: Result) -> str:
    if not r.json():
        return _last_line(r)
    t = r.json()[-1]
    return f"loss {t['final_loss']:.4f} after 2 steps, peak {_fmt(t['peak_memory_GB'], '.1f')} GB"


def _resume(r: Result) -> str:
    if not r.json():
        return _last_line(r)
    t = r.json()[-1]
    exact = "bit-exact" if t["exact"] else (
        f"max relative loss difference {t['max_rel_diff']:.2e} (two straight runs: "
        f"{t['straight_runs_rel_diff']:.2e})")
    return (f"resumed at 4, iterations {t['iterations']} {exact}; "
            f"saved {', '.join(t['checkpoints'])}")


def _size(r: Result) -> str:
    if not r.json():
        return _last_line(r)
    t = r.json()[-1]
    return (f"shape (L, D, heads, groups, FFN) {tuple(t['shape'])}, {t['iters']} iterations = "
            f"{t['tokens']:,} tokens = {t['epoch_fraction']:.1%} of an epoch (bound: {t['bound']})")


def _width(r: Result) -> str:
    if not r.json():
        return _last_line(r)
    t = r.json()[-1]
    return (f"{t['iterations']} iterations, held-out loss {_fmt(t['final_valid_loss'], '.4f')}, "
            f"{t['tokens_per_s']:.0f} tokens/s, setup {t['setup_s']:.0f} s")


def _warm(r: Result) -> str:
    t = r.json()[-1] if r.json() else None
    return f"{', '.join(t['compiled'])} in {t['seconds']:.0f} s" if t else _last_line(r)


SUMMARIES = {"kernels_bf16": _pytest, "gpu_tests": _pytest, "bench_vwn_torch": _bench,
             "bench_vwn_triton": _bench, "backbone_1b": _train, "moe_step": _moe,
             "ckpt_async_resume": _resume, "size_probe": _size, "triton_warm": _warm,
             **{f"dense_{w}": _width for w in ("x1", "x2", "x4", "x8")},
             **{f"moe_{w}": _width for w in ("x1", "x8")}}


def check_report(results: list[Result], c: Ctx) -> str:
    lines = _header("Device check", results, c)
    lines += ["### Virtual width vs backbone (`bench_vwn.py`), and memory", "",
              "| kernel | variant | step vs backbone | layer vs backbone | recompute: layer vs "
              "without | saved activations (MB) | vs backbone | peak (MB) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.step.name.startswith("bench_vwn"):
            lines += [f"| {r.step.name.split('_')[-1]} | {x['variant']} | "
                      f"{_fmt(x['step_ratio'])} | {_fmt(x['layer_ratio'])} | "
                      f"{_fmt(x['recompute_layer_cost'])} | "
                      f"{x['activation_MB']:.0f} | {_fmt(x['activation_ratio'], '.2f')} | "
                      f"{_fmt(x['peak_MB'], '.0f')} |" for x in r.json()]
    lines += ["", "Goal: (8,64) layer ratio <= 1.12 with the Triton kernels. Saved activations "
              "are exact bytes; peak is the allocator's peak of a step.", ""]
    return "\n".join(lines) + "\n"


def width_report(results: list[Result], c: Ctx) -> str:
    lines = _header("Width mini-sweep", results, c)
    plan_file = c.work / "plan.json"
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        lines += [f"Every dense run trained the same {plan['tokens']:,} tokens ({plan['iters']} "
                  f"iterations of {plan['tokens_per_iter']:,}), {plan['epoch_fraction']:.1%} of "
                  f"one epoch of the train split ({plan['epoch_tokens']:,} tokens), so no "
                  f"training token was seen twice; the budget is bound by {plan['bound']}. "
                  f"Held-out loss every {plan['eval_interval']} iterations on the same tokens "
                  f"(train.eval_mode=fixed). Size probe (the 8x of each shape tried; "
                  f"shape = layers, hidden, heads, query groups, FFN; medians after warm-up):",
                  ""]
        lines += [f"- {p['shape'] if isinstance(p['shape'], str) else tuple(p['shape'])}: "
                  f"{p['tokens_per_s']:.0f} tokens/s, {p['iter_time_s'] * 1e3:.1f} ms/iteration, "
                  f"setup {p['setup_s']:.0f} s, warm-up {p['warmup_s']:.1f} s"
                  for p in plan["probes"]]
        if "moe_iters" in plan:
            lines += ["", f"The MoE pair trained {plan['moe_iters'] * plan['tokens_per_iter']:,} "
                          f"tokens each ({plan['moe_iters']} iterations): the dense budget or "
                          f"what its 8x does in its time limit, whichever is less."]
        lines.append("")
    for group in ("dense", "moe"):
        report = c.work / "report" / group / "report.md"
        if report.is_file():
            body = report.read_text().split("\n## ")[0].splitlines()[1:]  # table and fit
            lines += [f"### {group} (`megatron-vwn report`; figures in the archive)", *body, ""]
    return "\n".join(lines) + "\n"


REPORTS = {"check": check_report, "width": width_report}


# --- carry accounting ----------------------------------------------------------------------------
def tree_bytes() -> int:
    """Tracked and untracked-not-ignored files: what the device tool sends besides `carry`."""
    names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names
               if n and (ROOT / n.decode()).is_file())


def carry_bytes(wheelhouse: Path) -> dict[str, tuple[int, str]]:
    """Bytes of what each call sends: built sizes where built, else the recorded ones."""
    wheels = sorted(wheelhouse.glob("*.whl"))
    corpus = [ROOT / f for f in CORPUS_FILES]
    return {
        "tree": (tree_bytes(), "measured"),
        "wheelhouse": (sum(w.stat().st_size for w in wheels), "built") if wheels
        else (RECORDED_BYTES["wheelhouse"], "recorded (not built here)"),
        "corpus": (sum(f.stat().st_size for f in corpus), "built")
        if all(f.is_file() for f in corpus)
        else (RECORDED_BYTES["corpus"], "recorded (not built here)"),
    }


def device_calls(wheelhouse: Path) -> dict[str, dict]:
    """The two device calls, as docs/gpu.md gives them."""
    wh = os.path.relpath(wheelhouse, ROOT)
    return {part: {"command": f"python3 scripts/gpu_check.py --part {part}",
                   "timeout_s": CALL_S,
                   "carry": [wh] + (CORPUS_FILES if part == "width" else [])}
            for part in PARTS}


def print_plan(c: Ctx) -> None:
    for part, build in PARTS.items():
        steps = build(c)
        total = sum(s.limit_s for s in steps)
        print(f"part {part}: {len(steps)} steps, limits sum to {total} s "
              f"(budget {STEP_BUDGET_S} s of a {CALL_S} s call)")
        for s in steps:
            note = f"  [{s.skip}]" if s.skip else ""
            command = shlex.join(s.argv).replace(f"{ROOT}/", "")
            print(f"  {s.name:<20} {s.limit_s:>4} s  {command}{note}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--part", choices=[*PARTS, "all"], default="all")
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU (CI)")
    p.add_argument("--dry-run", action="store_true", help="print the steps; run nothing")
    p.add_argument("--carry", action="store_true", help="print the carry accounting and calls")
    p.add_argument("--wheelhouse", type=Path, default=ROOT / "wheelhouse")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or
                                                    ROOT / "gpu_check_out"))
    ns = p.parse_args(argv)
    wheelhouse = ns.wheelhouse.resolve()
    if ns.carry:
        sizes = carry_bytes(wheelhouse)
        for name, (size, how) in sizes.items():
            print(f"{name:<10} {size / 2**20:7.2f} MiB  {how}")
        total = sum(size for size, _ in sizes.values())
        print(f"total      {total / 2**20:7.2f} MiB of {CARRY_LIMIT / 2**20:.0f} MiB")
        print(json.dumps(device_calls(wheelhouse), indent=1))
        return 0 if total < CARRY_LIMIT else 1
    if ns.dry_run:
        print_plan(Ctx(ns.cpu_smoke, Path("$WORK"), wheelhouse))
        return 0
    ns.out.mkdir(parents=True, exist_ok=True)
    ok = True
    for part in PARTS if ns.part == "all" else [ns.part]:
        work = Path(tempfile.mkdtemp(prefix=f"gpu_{part}_"))
        try:
            ok &= run_part(part, Ctx(ns.cpu_smoke, work, wheelhouse), ns.out.resolve())
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"reports in {ns.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
