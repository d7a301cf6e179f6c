#!/usr/bin/env bash
# Create or reuse .venv in the repo root and install megatron-vwn into it (editable), with the
# versions pinned in requirements.lock (the tested set; pip constraints), so a release upstream
# cannot change what a fresh install gets.
#   bash scripts/setup_env.sh [EXTRAS]      e.g. dev,hf
# CPU machines get the CPU torch wheel (torch==2.13.0), never the multi-GB CUDA build; machines
# with a CUDA driver keep the torch (and triton) they have, or get the default build, plus the
# `gpu` extra; the lock's other pins still apply there. Re-running is cheap: nothing is installed
# when pyproject.toml, the lock and the extras have not changed.
# MVWN_LOCK=off installs from pyproject.toml's ranges alone (what `bash scripts/lock.sh` does).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
LOCK="requirements.lock"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
constraints=()
if [ "${MVWN_LOCK:-on}" != off ]; then
  if has_cuda; then
    # The lock is the CPU set: keep the machine's own torch/triton and CUDA libraries.
    grep -v -i -E '^(torch|triton|nvidia-[a-z0-9-]+)==' "$LOCK" > .venv/constraints-cuda.txt
    constraints=(-c .venv/constraints-cuda.txt)
  else
    constraints=(-c "$LOCK")
  fi
fi
if has_cuda; then
  EXTRAS="${EXTRAS:+$EXTRAS,}gpu"
fi
stamp=".venv/.megatron-vwn-installed"
want="$(cat pyproject.toml "$LOCK" | sha256sum | cut -c1-16) extras=[${EXTRAS}] lock=${MVWN_LOCK:-on}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! has_cuda && ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  pip install "${constraints[@]}" "torch==2.13.0"
fi
# DS_BUILD_OPS=0: DeepSpeed (the `profile` extra) builds no C++/CUDA ops at install time.
DS_BUILD_OPS=0 pip install "${constraints[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
echo "$want" > "$stamp"
