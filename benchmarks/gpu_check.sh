#!/bin/sh
# Re-synchronize a permuted ~1.1B-parameter Llama-shaped model on CUDA and on the CPU, print both
# times and whether the permutations agree (benchmarks/gpu_check.py has the details).
# Needs a python3 with torch (numpy, scipy, safetensors, tqdm: what findlady_core imports), not
# the service stack; installs nothing. PYTHON=... picks the interpreter (default: python3).
#   benchmarks/gpu_check.sh                      # CUDA and CPU, full size
#   benchmarks/gpu_check.sh --cpu-only --small   # CPU alone, tiny model (CI)
set -eu
cd "$(dirname "$0")/.."
exec env PYTHONPATH=. "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
