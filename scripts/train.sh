#!/usr/bin/env bash
# Set up .venv (reused when present) and train: with no arguments the tiny default on the
# bundled corpus (CPU when there is no GPU). Arguments go to `megatron-vwn train`, e.g.
#   bash scripts/train.sh configs/gpt_125m.yaml parallel.tensor=2 --nproc 2
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/megatron-vwn train "$@"
