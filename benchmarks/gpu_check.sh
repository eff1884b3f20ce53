#!/usr/bin/env bash
# The prepared GPU check: run this once on a machine with an NVIDIA GPU.
#
#   benchmarks/gpu_check.sh            # the full check, about 5-8 minutes
#   benchmarks/gpu_check.sh --quick    # a smoke run (not for the record)
#
# Writes ONE results file, benchmarks/results/gpu-check-<host>-<date>.json
# (and a .md summary beside it): driver/GPU/CUDA/TensorRT versions, the
# NVML gauges through medge's collector, a cuda-python H2D/D2H round trip,
# ONNX Runtime CUDA vs CPU parity on every bundled artifact, and where
# TensorRT is installed: build and cached-load times, TensorRT vs ONNX
# Runtime fp32 parity per precision, batch 1 vs 4, the two-builder race,
# and `medge bench engine --backend tensorrt` per precision. A section whose
# library is missing says "skipped: <why>"; none of them fails the run.
#
# Python: $PYTHON if set, else the repository's .venv, else python3. It needs
# medge's dependencies; the GPU libraries are optional:
#   pip install -e '.[tensorrt]' onnxruntime-gpu      # (onnxruntime-gpu instead of onnxruntime)
# Other options are passed on to gpu_check.py (--help lists them).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
cd "$root"
echo "gpu_check: $("$py" --version 2>&1) at $(command -v "$py" || echo "$py")"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# gpu_check.py stops starting sections after --budget-s (450 s); this is the backstop.
exec timeout --signal=INT --kill-after=30 540 "$py" "$here/gpu_check.py" "$@"
