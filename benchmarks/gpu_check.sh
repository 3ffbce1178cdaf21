#!/usr/bin/env bash
# The GPU check in one command: install evlm into .venv-gpu-check unless this Python already
# imports it, then run benchmarks/gpu_check.py with the arguments given (--cpu on a machine
# without a GPU). Prints the figures; exits 1 when a check fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! python3 -c "import evlm_cli, torch, onnxruntime" 2>/dev/null; then
    python3 -m venv .venv-gpu-check
    # shellcheck disable=SC1091
    . .venv-gpu-check/bin/activate
    pip install --quiet -e '.[export]'
fi
exec timeout 480 python3 benchmarks/gpu_check.py "$@"
