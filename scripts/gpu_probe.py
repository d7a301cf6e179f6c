#!/usr/bin/env python
"""The work of one step of ``scripts/gpu_check.py``, run in its own process under that step's
time limit. Each subcommand ends by printing one JSON object on the last line of stdout, which
the report reads (logs go to stderr).

  env                       device, torch, Triton, Transformer Engine, Megatron-Core versions
  train LABEL CONFIG [k=v]  train in this process (no checkpoint writes: a 1B model's final
                            save is ~13 GB and is not what is measured); tokens/s, TFLOP/s, MFU
                            and peak memory as medians over the iterations after --warmup
  resume WORK [k=v]         8 iterations straight vs 4 + resume + 4 through the CLI (async
                            save where the config turns it on): bit-exact, or on a GPU no
                            further apart than two straight runs
  size PLAN ...             the width mini-sweep's shape and token budget, from a throughput
                            probe of its 8x (the slowest run) after warm-up
  warm                      compile the Triton GHC kernels of the given widths, so that no
                            timed run spends its time or its limit compiling
  width PLAN NAME           one run of the mini-sweep, as the plan says
  report WORK               megatron-vwn report over the dense runs (curves, speed-ups, the fit
                            over 2x-8x) and, apart, over the MoE pair (its 8x against its own
                            backbone, never the dense one)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}
"""Dense bf16 datasheet peaks (SXM), the denominator of MFU; other devices: MFU not given."""
MFU_GOAL = 0.45


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)


def cuda_device() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def peak_tflops() -> float:
    name = cuda_device() or ""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))


def cmd_env(ns) -> int:
    import platform
    from importlib import metadata

    import torch

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    cuda = torch.cuda.is_available()
    emit({"device": cuda_device() or "CPU", "torch": torch.__version__,
          "cuda": torch.version.cuda, "triton": version("triton"),
          "transformer_engine": version("transformer-engine"),
          "megatron_core": version("megatron-core"), "python": platform.python_version(),
          "memory_GB": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda
          else float("nan")})
    return 0


_import_s: list[float] = []  # interpreter start to torch and megatron imported, once a process


def train(config: str, overrides: list[str]) -> tuple[object, list[dict], float, int]:
    """One training run in this process, checkpoints not written; returns (config, metrics
    rows, setup seconds a fresh process spends before the first iteration, vocabulary)."""
    import psutil
    import torch

    from megatron_vwn.config import load_config, validate
    from megatron_vwn.parallel.env import resolve_dist_env
    from megatron_vwn.training.faults import RunGuard
    from megatron_vwn.training.trainer import Trainer

    imported = time.time()
    if not _import_s:
        _import_s.append(imported - psutil.Process().create_time())
    cfg = load_config(config, overrides)
    dist = resolve_dist_env()
    validate(cfg, dist.world_size)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with RunGuard().guard():
        trainer = Trainer(cfg, dist)
        trainer.checkpoints.save = lambda *args, **kwargs: True
        setup_s = _import_s[0] + time.time() - imported
        try:
            trainer.train()
        finally:
            trainer.close()
    rows = [json.loads(x) for x in (Path(cfg.run.dir) / "metrics.jsonl").open()]
    return cfg, rows, setup_s, trainer.vocab_size


def throughput(rows: list[dict], warmup: int) -> dict:
    """Medians over the train rows logged after ``warmup`` iterations (logging.interval=1)."""
    train_rows = [r for r in rows if r["split"] == "train"]
    kept = [r for r in train_rows if r["iteration"] > warmup] or train_rows[-1:]
    return {"iterations_timed": len(kept),
            "iter_time_s": statistics.median(r["iter_time_s"] for r in kept),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in kept),
            "tflops_per_s": statistics.median(r["tflops_per_s_per_rank"] for r in kept),
            "final_loss": train_rows[-1]["lm_loss"]}


def peak_memory_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() \
        else float("nan")


def cmd_train(ns) -> int:
    from megatron_vwn.model.accounting import count_params

    cfg, rows, _, vocab = train(ns.config, ns.overrides)
    result = throughput(rows, ns.warmup)
    emit({"label": ns.label, "params": count_params(cfg.model, vocab).total, **result,
          "mfu": result["tflops_per_s"] / peak_tflops(), "mfu_goal": MFU_GOAL,
          "peak_memory_GB": peak_memory_gb()})
    return 0


def cmd_resume(ns) -> int:
    """Straight 8 iterations vs 4, then a new process that resumes and runs 4 more. On a GPU a
    second straight run gives the floor: some kernels (attention's backward) are not
    deterministic there, so the resumed run must differ from the straight one by no more than
    two straight runs differ from each other; on CPU that floor is 0 (bit-exact)."""
    import torch

    work = Path(ns.work)

    def cli(run_dir: Path, iters: int) -> None:
        command = [sys.executable, "-m", "megatron_vwn", "train", "tiny", *ns.overrides,
                   f"train.iters={iters}", "train.lr_decay_iters=8", f"run.dir={run_dir}"]
        subprocess.run(command, check=True, cwd=REPO, stdout=sys.stderr)

    def losses(run_dir: Path) -> dict[int, float]:
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
        return {r["iteration"]: r["lm_loss"] for r in rows if r["split"] == "train"}

    def max_rel_diff(a: dict[int, float], b: dict[int, float]) -> float:
        return max(abs(a[i] - b[i]) / abs(a[i]) for i in (5, 6, 7, 8))

    started = time.perf_counter()
    cli(work / "straight", 8)
    cli(work / "resumed", 4)
    cli(work / "resumed", 8)
    straight, resumed = losses(work / "straight"), losses(work / "resumed")
    after = [i for i in sorted(resumed) if i > 4]
    floor = 0.0
    if torch.cuda.is_available():
        cli(work / "straight_again", 8)
        floor = max_rel_diff(straight, losses(work / "straight_again"))
    diff = max_rel_diff(straight, resumed) if after == [5, 6, 7, 8] else math.inf
    checkpoints = sorted(p.name for p in (work / "resumed" / "checkpoints").glob("iter_*"))
    emit({"iterations": after, "max_rel_diff": diff, "straight_runs_rel_diff": floor,
          "exact": diff == 0.0, "checkpoints": checkpoints,
          "seconds": time.perf_counter() - started})
    return 0 if diff <= floor else 1


# --- the width mini-sweep -----------------------------------------------------------------------
# Dense shapes the size probe chooses from, largest first: layers, hidden, heads, query groups,
# FFN. Heads of 64 (the CPU smoke's of 16); every hidden size divides by m = 8.
LADDER = {"gpu": [(12, 768, 12, 4, 2048), (8, 512, 8, 4, 1536), (6, 384, 6, 2, 1024)],
          "smoke": [(2, 64, 4, 2, 128), (1, 32, 2, 1, 64)]}
WIDTHS = {"x1": (1, 1), "x2": (8, 16), "x4": (8, 32), "x8": (8, 64)}
"""The sweep's mapping (launch/sweep.py, width_to_vwn): r = n/m."""


def shape_overrides(shape) -> list[str]:
    layers, hidden, heads, groups, ffn = shape
    return [f"model.num_layers={layers}", f"model.hidden_size={hidden}",
            f"model.num_attention_heads={heads}", f"model.num_query_groups={groups}",
            f"model.ffn_hidden_size={ffn}"]


def width_overrides(plan: dict, name: str, run_dir: Path) -> list[str]:
    """A run of the plan: ``x1``..``x8`` dense, ``moe_x1``/``moe_x8`` the MoE model in its own
    shape with the MoE pair's budget."""
    moe = name.startswith("moe_")
    m, n = WIDTHS[name.removeprefix("moe_")]
    iters = plan["moe_iters"] if moe else plan["iters"]
    common = plan["common"]
    if moe:
        shape_keys = {o.split("=")[0] for o in shape_overrides(plan["shape"])}
        common = [o for o in common if o.split("=")[0] not in shape_keys]
    vwn = [] if (m, n) == (1, 1) else [f"model.vwn.m={m}", f"model.vwn.n={n}"]
    return [*common, *vwn, f"train.iters={iters}", f"train.lr_decay_iters={iters}",
            f"train.warmup_iters={max(1, iters // 20)}",
            f"train.eval_interval={plan['moe_eval_interval' if moe else 'eval_interval']}",
            f"run.dir={run_dir}", f"run.name={name}"]


def epoch_tokens(overrides: list[str]) -> int:
    """Tokens in the train split's documents (``data.split`` takes whole documents in file
    order, docs/data.md): what one epoch is, for the one dataset the overrides name (or the
    bundled corpus, built as the trainer builds it)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_vwn.config import load_config
    from megatron_vwn.data.datasets import prepare_data

    data = load_config("tiny", overrides).data
    (prefix,) = prepare_data(data).paths
    shares = [float(x) for x in data.split.split(",")]
    dataset = IndexedDataset(prefix)  # its lengths are a view of its memory map: keep it open
    lengths = dataset.sequence_lengths
    return int(lengths[:round(shares[0] / sum(shares) * len(lengths))].sum())


def cmd_size(ns) -> int:
    """Probe the 8x of the middle shape of the ladder; one shape up if the wanted budget (one
    epoch; less under --max-iters) fits a run's time limit, one down if it does not; keep the
    largest that fits (else the smallest). The dense runs' token budget is then that or what
    the 8x does in its time, whichever is less, the same for all four. With --moe-config the
    MoE model's 8x is probed too, and the MoE pair gets the dense budget or what fits its own
    limit, whichever is less, the same for both."""
    import torch

    common = [*ns.common, f"model.seq_length={ns.seq}", f"train.micro_batch_size={ns.batch}",
              f"train.global_batch_size={ns.batch}", f"train.eval_iters={ns.eval_iters}",
              "logging.interval=1", "logging.wandb=off", f"data.cache_dir={ns.cache}"]
    tokens_per_iter = ns.seq * ns.batch
    epoch = epoch_tokens(common)
    epoch_iters = epoch // tokens_per_iter
    wanted_iters = min(epoch_iters, ns.max_iters or epoch_iters)
    ladder = LADDER[ns.ladder]

    def probe(name: str, config: str, shape: list[str], run_limit: float) -> dict:
        overrides = [*common, *shape, "model.vwn.m=8", "model.vwn.n=64",
                     f"train.iters={ns.probe_iters}", "train.eval_interval=0",
                     f"run.dir={Path(ns.plan).parent / 'probes' / name}"]
        _, rows, setup_s, _ = train(config, overrides)
        result = throughput(rows, ns.probe_warmup)
        first = [r["iter_time_s"] for r in rows if r["split"] == "train"][:ns.probe_warmup]
        warmup_s = sum(first) - len(first) * result["iter_time_s"]  # compiles, allocator
        # A run's time: setup, warm-up, its iterations and 8 held-out scorings of eval_iters
        # forward passes (a third of an iteration each); 30% kept back for a run's own noise.
        train_s = 0.7 * run_limit - setup_s - warmup_s
        iters_in_time = int(train_s / result["iter_time_s"] - 8 * ns.eval_iters / 3)
        result.update(name=name, setup_s=setup_s, warmup_s=warmup_s,
                      iters_in_time=iters_in_time, fits=iters_in_time >= wanted_iters)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return result

    def dense(index: int) -> dict:
        return probe(f"dense{index}", "tiny", shape_overrides(ladder[index]), ns.run_limit)

    middle = len(ladder) // 2
    probes = {middle: dense(middle)}
    step = -1 if probes[middle]["fits"] else 1
    if 0 <= middle + step < len(ladder):
        probes[middle + step] = dense(middle + step)
    fitting = [i for i in sorted(probes) if probes[i]["fits"]]
    chosen = fitting[0] if fitting else max(probes)
    iters = max(2, min(wanted_iters, probes[chosen]["iters_in_time"]))
    measured = [{**probes[i], "shape": ladder[i]} for i in sorted(probes)]
    plan = {"shape": ladder[chosen], "iters": iters, "eval_interval": max(1, iters // 8),
            "tokens_per_iter": tokens_per_iter, "tokens": iters * tokens_per_iter,
            "epoch_tokens": epoch, "epoch_fraction": iters * tokens_per_iter / epoch,
            "bound": "one epoch" if iters == epoch_iters else
                     "CPU smoke cap" if iters == ns.max_iters else "the run's time limit",
            "common": [*common, *shape_overrides(ladder[chosen]), "logging.interval=10"]}
    if ns.moe_config:
        moe = probe("moe", ns.moe_config, [], ns.moe_limit)
        measured.append({**moe, "shape": ns.moe_config})
        plan["moe_iters"] = max(2, min(iters, moe["iters_in_time"]))
        plan["moe_eval_interval"] = max(1, plan["moe_iters"] // 8)
    plan["probes"] = [{k: p[k] for k in ("shape", "tokens_per_s", "iter_time_s", "setup_s",
                                         "warmup_s", "iters_in_time")} for p in measured]
    Path(ns.plan).write_text(json.dumps(plan, indent=1))
    emit({k: plan[k] for k in ("shape", "iters", "tokens", "epoch_fraction", "bound", "probes")}
         | {k: plan[k] for k in ("moe_iters",) if k in plan})
    return 0


def cmd_warm(ns) -> int:
    """Forward and backward of one GHC module per width at the given hidden size (or the
    plan's) in the training dtype: Triton keys its cache on the constexpr shapes (m, n, d_b),
    the dtype and whether each integer argument is 1 or a multiple of 16, so a token count
    that is a multiple of 16, as every timed run's is, warms what those runs use (the gpu
    tests' odd 301 tokens compile other variants)."""
    import torch

    from megatron_vwn.model.width.ghc import GHC, vwn_init

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    hidden = ns.hidden or json.loads(Path(ns.plan).read_text())["shape"][1]
    started, compiled = time.perf_counter(), []
    for name in ns.widths:
        m, n = WIDTHS[name]
        d_b = hidden // m
        ghc = GHC(m, n, d_b, vwn_init(m, n, d_b), device=device, kernel="triton").to(dtype)
        state = torch.randn(ns.tokens, 1, n * d_b, device=device, dtype=dtype, requires_grad=True)
        z = torch.randn(ns.tokens, 1, m * d_b, device=device, dtype=dtype, requires_grad=True)
        x, saved = ghc.read(state)
        out = ghc.write(z, saved)
        (x.float().sum() + out.float().sum()).backward()
        compiled.append(f"({m},{n}) d_b={d_b}")
    if cuda:
        torch.cuda.synchronize()
    emit({"compiled": compiled, "dtype": str(dtype), "seconds": time.perf_counter() - started})
    return 0


def cmd_width(ns) -> int:
    plan = json.loads(Path(ns.plan).read_text())
    run_dir = Path(ns.plan).parent / "runs" / ns.name
    overrides = width_overrides(plan, ns.name, run_dir)
    started = time.perf_counter()
    _, rows, setup_s, _ = train(ns.config, overrides)
    valid = [r for r in rows if r["split"] == "valid"]
    train_rows = [r for r in rows if r["split"] == "train"]
    emit({"run": ns.name, "iterations": train_rows[-1]["iteration"],
          "final_valid_loss": valid[-1]["lm_loss"] if valid else math.nan,
          "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train_rows[1:]
                                            or train_rows),
          "setup_s": setup_s, "seconds": time.perf_counter() - started,
          "peak_memory_GB": peak_memory_gb()})
    return 0


def cmd_report(ns) -> int:
    runs, status = Path(ns.work) / "runs", 0
    for group, names in (("dense", ["x1", "x2", "x4", "x8"]), ("moe", ["moe_x1", "moe_x8"])):
        found = [str(runs / n) for n in names if (runs / n / "metrics.jsonl").is_file()]
        if found:
            status |= subprocess.run([sys.executable, "-m", "megatron_vwn", "report", *found,
                                      "--out", str(Path(ns.work) / "report" / group)],
                                     stdout=sys.stderr).returncode
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env").set_defaults(run=cmd_env)
    p = sub.add_parser("train")
    p.add_argument("label")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--warmup", type=int, default=3, help="iterations left out of the medians")
    p.set_defaults(run=cmd_train)
    p = sub.add_parser("resume")
    p.add_argument("work")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(run=cmd_resume)
    p = sub.add_parser("size")
    p.add_argument("plan")
    p.add_argument("--ladder", choices=sorted(LADDER), default="gpu")
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--batch", type=int, required=True, help="global = micro batch")
    p.add_argument("--eval-iters", type=int, required=True)
    p.add_argument("--run-limit", type=float, required=True, help="a width run's limit (s)")
    p.add_argument("--probe-iters", type=int, required=True)
    p.add_argument("--probe-warmup", type=int, required=True)
    p.add_argument("--max-iters", type=int, default=0, help="cap (CPU smoke); 0: none")
    p.add_argument("--moe-config", help="the MoE model's config, when there is one")
    p.add_argument("--moe-limit", type=float, default=0, help="an MoE run's limit (s)")
    p.add_argument("--cache", required=True, help="data.cache_dir")
    p.add_argument("--common", nargs="*", default=[], help="overrides every run shares")
    p.set_defaults(run=cmd_size)
    p = sub.add_parser("warm")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--plan", help="the size probe's plan: its hidden size")
    given.add_argument("--hidden", type=int)
    p.add_argument("--widths", nargs="+", choices=[w for w in WIDTHS if w != "x1"],
                   required=True)
    p.add_argument("--tokens", type=int, required=True, help="a multiple of 16, like the runs'")
    p.set_defaults(run=cmd_warm)
    p = sub.add_parser("width")
    p.add_argument("plan")
    p.add_argument("name", choices=[*WIDTHS, "moe_x1", "moe_x8"])
    p.add_argument("--config", default="tiny")
    p.set_defaults(run=cmd_width)
    p = sub.add_parser("report")
    p.add_argument("work")
    p.set_defaults(run=cmd_report)
    ns = parser.parse_args(argv)
    os.chdir(REPO)  # shipped config names and relative data paths resolve from the repo
    return ns.run(ns)


if __name__ == "__main__":
    sys.exit(main())
