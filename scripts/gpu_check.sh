#!/usr/bin/env bash
# The device check (docs/gpu.md): scripts/gpu_check.py with the interpreter that holds torch
# ($PYTHON, else python3, as on the lent GPU machine). Arguments go through, e.g.
#   bash scripts/gpu_check.sh --part check        # one device call, ~4 minutes
#   bash scripts/gpu_check.sh --dry-run           # every step with its time limit
#   bash scripts/gpu_check.sh --cpu-smoke --out DIR   # both parts at toy size on CPU (CI)
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/gpu_check.py" "$@"
