#!/usr/bin/env bash
# Create or reuse .venv in the repo root and install megatron-vwn into it (editable).
# CPU machines get the CPU torch wheel (torch==2.13.0), never the multi-GB CUDA build; machines
# with a CUDA driver keep the torch they have, or get the default build, plus the `gpu` extra.
# Re-running is cheap: nothing is installed when pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if has_cuda; then
  EXTRAS="${EXTRAS:+$EXTRAS,}gpu"
fi
stamp=".venv/.megatron-vwn-installed"
want="$(sha256sum pyproject.toml | cut -c1-16) extras=[${EXTRAS}]"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! has_cuda && ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  pip install "torch==2.13.0"
fi
pip install -e ".${EXTRAS:+[$EXTRAS]}"
echo "$want" > "$stamp"
