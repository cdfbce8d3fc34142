#!/usr/bin/env bash
# The GPU suite in one command: tbptt_jax against PyTorch's cuDNN nn.LSTM / nn.RNN on r2rt and
# the small and medium language models, float32 and bfloat16; a table, and one JSON file
# (benchmarks/results/gpu.json, or --out). About 8 minutes at most (--budget 450 seconds).
#
# Expects an NVIDIA GPU (written for an H100 or H200) and a Python whose jax has CUDA
# (jax[cuda12]), with flax, optax and torch (a CUDA build) installed; then, at the repository root:
#   pip install --no-deps -e .
# Arguments go to benchmarks/gpu.py (--help lists them), e.g.
#   bash benchmarks/gpu.sh --presets small medium large --seconds 20 --budget 900
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu.py "$@"
