#!/usr/bin/env bash
# One-shot device check: everything a GPU run of megatron-vwn needs measured, in one call.
#
#   bash scripts/gpu_check.sh [--wheelhouse DIR] [REPORT_DIR]   # on a CUDA machine (~8 min)
#   bash scripts/gpu_check.sh --cpu-smoke [REPORT_DIR]          # every step at toy size on CPU
#
# On a machine with CUDA, Python 3.12, torch and Triton but no package registry it installs
# megatron-core and megatron-vwn from the wheelhouse (scripts/build_wheelhouse.sh, default
# ./wheelhouse) into a private target, then runs, each step under its own time limit:
#   1. the gpu-marked tests (tests/gpu: Triton vs torch GHC in bf16/fp32, TE vs local spec where
#      TE is installed, bf16 vs fp32 loss);
#   2. scripts/bench_vwn.py at D=2048 in bf16 with the torch and the Triton GHC kernels;
#   3. MFU and peak memory of a ~1B backbone (gpt_1p3b at TP=1, 4k vocabulary: 1.1B) and its
#      8x (8,64) for 30 steps through the CLI;
#   4. an async checkpoint save and exact resume (tiny: 8 steps straight vs 4 + resume + 4);
#   5. scripts/bench_step.py (ours vs stock Megatron-Core).
# It writes one markdown report, REPORT_DIR/gpu_check.md (REPORT_DIR: $OUT if set, else
# ./gpu_check_out), ready for docs/benchmarks.md, plus gpu_check.log with every step's output.
# A failing step is reported and the next one still runs; the exit status is 1 if any failed.
# --cpu-smoke uses the current environment and toy sizes (the Triton bench runs under Triton's
# interpreter), so the script cannot rot without CI noticing (tests/integration).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SMOKE=0
WHEELS="$ROOT/wheelhouse"
REPORT_DIR="${OUT:-$ROOT/gpu_check_out}"
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) SMOKE=1 ;;
        --wheelhouse) WHEELS="$2"; shift ;;
        -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) REPORT_DIR="$1" ;;
    esac
    shift
done
PY="${PYTHON:-python3}"
mkdir -p "$REPORT_DIR"
REPORT_DIR="$(cd "$REPORT_DIR" && pwd)"
WORK="$(mktemp -d)"
LOG="$REPORT_DIR/gpu_check.log"
: >"$LOG"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" WANDB_MODE=disabled PYTHONUNBUFFERED=1
cd "$ROOT"

if [ "$SMOKE" = 1 ]; then
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    INSTALL="current environment (--cpu-smoke)"
else
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "no wheels in $WHEELS: run scripts/build_wheelhouse.sh where PyPI is reachable" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$WHEELS"/*.whl >>"$LOG" 2>&1 || { cat "$LOG"; exit 2; }
    export PYTHONPATH="$WORK/site"
    INSTALL="$(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
fi

STEPS="$WORK/steps.tsv"
: >"$STEPS"
# step NAME LIMIT_S CMD...: run with a time limit, keep its output for the report.
step() {
    local name="$1" limit="$2"
    shift 2
    local start rc
    start=$(date +%s)
    echo "=== $name ($*)" >>"$LOG"
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.out" 2>&1
    rc=$?
    cat "$WORK/$name.out" >>"$LOG"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >>"$STEPS"
    echo "$name: rc=$rc ($(( $(date +%s) - start )) s)"
}

# --- the helper that trains through the CLI and measures MFU and peak memory -------------------
cat >"$WORK/train_probe.py" <<'PYEOF'
"""Train through the CLI in this process; print one JSON line: MFU inputs and peak memory."""
import json, shutil, statistics, sys
from pathlib import Path
import torch
from megatron_vwn.cli import main

label, run_dir, *overrides = sys.argv[1:]
rc = main(["train", *overrides, f"run.dir={run_dir}"])
rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").open()]
train = [r for r in rows if r["split"] == "train"][1:] or [r for r in rows if r["split"] == "train"]
cuda = torch.cuda.is_available()
tflops = statistics.median(r["tflops_per_s_per_rank"] for r in train)
peak_tflops = 989.0 if cuda else float("nan")  # H100 SXM / H200 dense bf16 (datasheet)
print(json.dumps({
    "label": label, "rc": rc, "tflops_per_s": tflops, "mfu": tflops / peak_tflops,
    "iter_time_s": statistics.median(r["iter_time_s"] for r in train),
    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
    "peak_memory_GB": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
    "final_loss": train[-1]["lm_loss"]}))
shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)  # GBs at 1B; not needed
PYEOF

# --- the helper that compares the straight and the resumed checkpoint runs ---------------------
cat >"$WORK/resume_check.py" <<'PYEOF'
import json, sys
from pathlib import Path
def losses(d):
    rows = [json.loads(x) for x in (Path(d) / "metrics.jsonl").open()]
    return {r["iteration"]: r["lm_loss"] for r in rows if r["split"] == "train"}
straight, resumed = losses(sys.argv[1]), losses(sys.argv[2])
after = [i for i in sorted(resumed) if i > int(sys.argv[3])]
diff = max(abs(straight[i] - resumed[i]) / abs(straight[i]) for i in after)
ckpts = sorted(p.name for p in (Path(sys.argv[2]) / "checkpoints").glob("iter_*"))
print(json.dumps({"iterations": after, "max_rel_diff": diff, "exact": diff == 0.0,
                  "checkpoints": ckpts}))
sys.exit(0 if after and diff < 1e-6 else 1)
PYEOF

if [ "$SMOKE" = 1 ]; then
    VWN_ARGS=(--hidden 128 --seq 8 --vocab 128 --layers 1 --rounds 1 --steps 1 --layer-reps 1
              --variants backbone "8x (8,64)" "8x (8,64) recompute=ghc")
    STEP_ARGS=(--layers 1 --hidden 64 --heads 4 --groups 2 --seq 32 --mbs 1 --vocab 128
               --steps 1 --rounds 1 --warmup 1)
    BIG=(model.num_layers=1 model.hidden_size=64 model.num_attention_heads=4
         model.num_query_groups=2 model.ffn_hidden_size=128 model.seq_length=32
         train.micro_batch_size=2 train.global_batch_size=2 train.iters=3)
    ITERS_BIG=3
    ASYNC=()
    TRITON_ENV=(env TRITON_INTERPRET=1)
    LIMIT=300
else
    VWN_ARGS=(--hidden 2048 --precision bf16 --rounds 3
              --variants backbone "1.5x (2,3)" "2x (8,16)" "8x (8,64)" "8x (8,64) recompute=ghc")
    STEP_ARGS=(--precision bf16)
    BIG=(gpt_1p3b parallel.tensor=1 parallel.sequence_parallel=false data.tokenizer_vocab_size=4096
         train.micro_batch_size=4 train.global_batch_size=8 train.iters=30)
    ITERS_BIG=30
    ASYNC=(checkpoint.async_save=true)
    TRITON_ENV=()
    LIMIT=150
fi
COMMON=(logging.wandb=off logging.interval=1 train.eval_interval=0 train.warmup_iters=2
        "data.cache_dir=$WORK/data")

step gpu_tests "$LIMIT" "$PY" -m pytest -q -p no:cacheprovider -p no:warnings -m gpu tests/gpu
step bench_vwn_torch "$LIMIT" "$PY" scripts/bench_vwn.py "${VWN_ARGS[@]}" --kernel torch --json
step bench_vwn_triton "$LIMIT" "${TRITON_ENV[@]}" "$PY" scripts/bench_vwn.py "${VWN_ARGS[@]}" \
    --kernel triton --json
step train_backbone "$LIMIT" "$PY" "$WORK/train_probe.py" backbone "$WORK/run_backbone" \
    "${BIG[@]}" "${COMMON[@]}" "train.lr_decay_iters=$ITERS_BIG"
step train_8x "$LIMIT" "$PY" "$WORK/train_probe.py" "8x (8,64)" "$WORK/run_8x" "${BIG[@]}" \
    "${COMMON[@]}" "train.lr_decay_iters=$ITERS_BIG" model.vwn.m=8 model.vwn.n=64
CKPT=(tiny model.num_layers=2 train.micro_batch_size=4 train.global_batch_size=8
      train.lr_decay_iters=8 train.warmup_iters=2 checkpoint.save_interval=4 "${ASYNC[@]}"
      "${COMMON[@]}")
step ckpt_straight "$LIMIT" "$PY" -m megatron_vwn train "${CKPT[@]}" train.iters=8 \
    "run.dir=$WORK/ckpt_a"
step ckpt_first_half "$LIMIT" "$PY" -m megatron_vwn train "${CKPT[@]}" train.iters=4 \
    "run.dir=$WORK/ckpt_b"
step ckpt_resume "$LIMIT" "$PY" -m megatron_vwn train "${CKPT[@]}" train.iters=8 \
    "run.dir=$WORK/ckpt_b"
step ckpt_compare 60 "$PY" "$WORK/resume_check.py" "$WORK/ckpt_a" "$WORK/ckpt_b" 4
step bench_step "$LIMIT" "$PY" scripts/bench_step.py "${STEP_ARGS[@]}" --json

# --- the report ---------------------------------------------------------------------------------
"$PY" - "$WORK" "$REPORT_DIR/gpu_check.md" "$SMOKE" "$INSTALL" <<'PYEOF'
import json, sys, datetime, platform
from pathlib import Path
import torch
work, report, smoke, install = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]

def out(name):
    p = work / f"{name}.out"
    return p.read_text() if p.exists() else ""

def jsons(name):
    rows = []
    for line in out(name).splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows

try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
try:
    import transformer_engine  # noqa: F401
    te = "installed"
except ImportError:
    te = "not installed (local spec)"
cuda = torch.cuda.is_available()
device = torch.cuda.get_device_name() if cuda else "CPU (--cpu-smoke, toy sizes)"
steps = [line.split("\t") for line in (work / "steps.tsv").read_text().splitlines()]
lines = [f"## Device check {datetime.date.today().isoformat()}: {device}", "",
         f"torch {torch.__version__}, Triton {triton_version}, Transformer Engine {te}, "
         f"Python {platform.python_version()}; installed: {install}", ""]
if smoke:
    lines += ["*CPU smoke run: toy sizes, the figures mean nothing.*", ""]
lines += ["| step | status | seconds |", "|---|---|---|"]
lines += [f"| {n} | {'ok' if rc == '0' else 'FAILED (rc ' + rc + ')'} | {s} |"
          for n, rc, s in steps]
tests = [l for l in out("gpu_tests").splitlines() if " passed" in l or " skipped" in l
         or " failed" in l]
lines += ["", f"GPU tests: {tests[-1].strip('= ') if tests else 'no summary'}", ""]
lines += ["### VWN vs backbone (`bench_vwn.py`)", "",
          "| kernel | D | variant | step vs backbone | layer vs backbone | recompute: layer "
          "time vs without | act. vs backbone | peak (MB) |", "|---|---|---|---|---|---|---|---|"]
for kernel in ("torch", "triton"):
    for r in jsons(f"bench_vwn_{kernel}"):
        cost = r.get("recompute_layer_cost")
        cost = "" if cost is None or cost != cost else f"{cost:.3f}"
        lines.append(f"| {kernel} | {r['hidden']} | {r['variant']} | {r['step_ratio']:.3f} | "
                     f"{r['layer_ratio']:.3f} | {cost} | {r['activation_ratio']:.2f} | "
                     f"{r['peak_MB']:.0f} |")
lines += ["", "### ~1B backbone and its 8x through the CLI", "",
          "| model | TFLOP/s | MFU (of 989) | s/iter | tokens/s | peak memory (GB) | loss |",
          "|---|---|---|---|---|---|---|"]
for name in ("train_backbone", "train_8x"):
    for r in jsons(name):
        lines.append(f"| {r['label']} | {r['tflops_per_s']:.1f} | {r['mfu']:.3f} | "
                     f"{r['iter_time_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_memory_GB']:.1f} | {r['final_loss']:.4f} |")
resume = jsons("ckpt_compare")
lines += ["", "### Checkpoint: async save and resume", ""]
if resume:
    r = resume[-1]
    lines.append(f"Resumed from iteration 4: iterations {r['iterations']} "
                 f"{'bit-exact' if r['exact'] else 'max relative loss difference ' + format(r['max_rel_diff'], '.2e')}"
                 f"; checkpoints written: {', '.join(r['checkpoints'])}.")
else:
    lines.append("No result (see gpu_check.log).")
lines += ["", "### Backbone vs stock Megatron-Core (`bench_step.py`)", ""]
for r in jsons("bench_step"):
    lines.append(f"{r['device']}, {r['impl']}, {r['dtype']}, L={r['layers']} D={r['hidden']} "
                 f"s={r['seq']} b={r['mbs']}: ours {r['ours_s'] * 1e3:.1f} ms, stock "
                 f"{r['stock_s'] * 1e3:.1f} ms, ratio {r['ratio']:.3f} (goal <= 1.01)")
report.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
rm -rf "$WORK"
if grep -q "FAILED" "$REPORT_DIR/gpu_check.md"; then exit 1; fi
