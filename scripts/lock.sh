#!/usr/bin/env bash
# Refresh requirements.lock: resolve pyproject.toml (every CPU extra) in a fresh venv and pin
# what pip installed. Run it, run `bash scripts/test.sh`, and commit the lock if it is green:
#     bash scripts/lock.sh
# The lock is for CPU machines on the Python that runs this (3.11 here); scripts/setup_env.sh
# drops its torch/triton pins on CUDA machines, which bring their own.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="dev,hf,analysis,profile,kernels,tensorboard"
PY="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
pip() { "$tmp/venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install "torch==2.13.0"  # the CPU wheel (see setup_env.sh)
DS_BUILD_OPS=0 pip install ".[${EXTRAS}]"
{
  echo "# The tested set for CPU machines, Python $("$tmp/venv/bin/python" -c 'import sys; print(*sys.version_info[:2], sep=".")'): pyproject.toml [${EXTRAS}]"
  echo "# resolved on $(date -u +%Y-%m-%d). Refresh: bash scripts/lock.sh (then run the tests). Used as pip"
  echo "# constraints by scripts/setup_env.sh."
  pip freeze --exclude-editable --all | grep -v -i -E '^(megatron-vwn|pip|setuptools|wheel)( @|==)' \
    | sed -E 's/^(torch==[^+]+)\+cpu$/\1/' | LC_ALL=C sort -f
} > requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) pins)"
