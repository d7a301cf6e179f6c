#!/usr/bin/env bash
# CI's "newest" leg: the releases users get today, not the lock. Sets up .venv-newest (reused
# when present) with pyproject.toml's ranges, the newest transformers that installs, and
# Megatron-Core MVWN_NEWEST_MCORE (0.19.2, what a Python 3.12 GPU machine resolves). On Python
# < 3.12 pip refuses 0.17+ by its metadata, so it is forced there (its cp311 wheel works, and it
# imports triton, which is installed with it). Then runs pytest on the given paths (default:
# the whole suite).
#   bash scripts/test_newest.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
MCORE="${MVWN_NEWEST_MCORE:-0.19.2}"
PY="${PYTHON:-python3}"
VENV=.venv-newest
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.megatron-vwn-installed"
want="$(sha256sum pyproject.toml | cut -c1-16) mcore=${MCORE}"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -c "import torch" >/dev/null 2>&1 || pip install "torch==2.13.0"
  DS_BUILD_OPS=0 pip install -e ".[dev,hf,analysis,profile,kernels,tensorboard]"
  pip install --upgrade transformers safetensors
  if "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    pip install "megatron-core==${MCORE}"
  else
    pip install --no-deps --ignore-requires-python "megatron-core==${MCORE}"
  fi
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import re
import sys
import tomllib

from packaging.requirements import Requirement

print("newest leg:", ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "megatron-core", "transformers", "safetensors", "triton")))
# The releases this leg tests must be inside pyproject.toml's ranges, or the ranges would
# promise (or shut out) releases nobody has tested: widen the range in the same change.
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
declared = [*project["dependencies"], *[r for extra in project["optional-dependencies"].values()
                                         for r in extra]]
outside = []
for name in ("megatron-core", "transformers"):
    for requirement in map(Requirement, declared):
        if re.sub(r"[-_.]+", "-", requirement.name.lower()) == name:
            installed = md.version(name)
            if not requirement.specifier.contains(installed, prereleases=True):
                outside.append(f"{name} {installed} is outside pyproject.toml's "
                               f"'{requirement}'")
if outside:
    sys.exit("newest leg: " + "; ".join(outside) + " (test it, then move the bound)")
PY
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" WANDB_MODE="${WANDB_MODE:-disabled}"
exec "$VENV/bin/python" -m pytest -q -ra --durations=15 "${@:-tests}"
