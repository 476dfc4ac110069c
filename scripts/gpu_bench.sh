#!/usr/bin/env bash
# On a lent device, from the repository root: scripts/gpu_bench.sh [gpu_bench.py flags]
# The image's python3 holds JAX (CUDA) and torch; wheels carried in .whl/ are installed by the
# script; the JSON lands in $OUT (what the device tool brings back). See docs/operating.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/gpu_bench.py --out "${OUT:-.}/gpu_bench.json" "$@"
