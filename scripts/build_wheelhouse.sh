#!/usr/bin/env bash
# Build, on a machine with PyPI, the wheelhouse that scripts/gpu_check.py installs from on a GPU
# machine that has CUDA, Python 3.12, torch and Triton but no package registry.
#
#   bash scripts/build_wheelhouse.sh [OUT_DIR]        # default: wheelhouse/ (gitignored)
#
# It holds cp312 manylinux x86_64 wheels of what such a machine lacks: megatron-core, fetched
# with pip's --platform options. Its own dependencies (numpy, packaging) and ours (PyYAML,
# sentencepiece, psutil, tqdm; matplotlib for reports) are on this workplace's GPU image
# (docs/gpu.md). megatron-vwn itself runs from the carried tree, not a wheel: its configs/ live
# beside the package. wandb is not needed: the check runs with logging.wandb=off and the package
# imports it only when logging to wandb. Transformer Engine goes in only if a binary
# wheel for the platform can be had within the size budget; otherwise the device check runs the
# local spec and says so. The whole wheelhouse must stay under 64 MiB (what the device tool
# carries); the script fails above that.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/wheelhouse}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
LIMIT_MB=64
MEGATRON_CORE="${MEGATRON_CORE:-megatron-core==0.16.1}"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
FETCH=("$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12
       --implementation cp "${PLATFORMS[@]}" --dest "$OUT")

rm -rf "$OUT"
mkdir -p "$OUT"
echo "wheelhouse: $OUT"
"${FETCH[@]}" "$MEGATRON_CORE"

# Transformer Engine: its PyTorch extension ships as a source distribution and its core library
# wheel is far above the budget, so this normally finds nothing that fits.
TE_DIR="$(mktemp -d)"
if "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" --dest "$TE_DIR" transformer-engine-torch \
        >/dev/null 2>&1; then
    te_mb=$(du -sm "$TE_DIR" | cut -f1)
    used_mb=$(du -sm "$OUT" | cut -f1)
    if [ $((te_mb + used_mb)) -lt "$LIMIT_MB" ]; then
        cp "$TE_DIR"/*.whl "$OUT"/
        echo "transformer-engine: included (${te_mb} MiB)"
    else
        echo "transformer-engine: a wheel exists but is ${te_mb} MiB; left out (local spec)"
    fi
else
    echo "transformer-engine: no binary wheel for cp312 manylinux x86_64; left out (local spec)"
fi
rm -rf "$TE_DIR"

ls -l "$OUT"
total_kb=$(du -sk "$OUT" | cut -f1)
echo "total: $((total_kb / 1024)) MiB ($total_kb KiB) in $(ls "$OUT"/*.whl | wc -l) wheels"
if [ "$total_kb" -ge $((LIMIT_MB * 1024)) ]; then
    echo "error: the wheelhouse is over ${LIMIT_MB} MiB" >&2
    exit 1
fi
