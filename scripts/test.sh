#!/usr/bin/env bash
# Set up .venv with every extra the tests use (reused when present; versions from
# requirements.lock) and run the CPU test suite.
# Arguments go to pytest, e.g. `bash scripts/test.sh tests/unit -k config`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev,hf,analysis,profile,kernels,tensorboard
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" WANDB_MODE="${WANDB_MODE:-disabled}"
exec .venv/bin/python -m pytest -q -ra --durations=15 "${@:-tests}"
