#!/usr/bin/env bash
# Issue 13: the one prepared GPU run. Installs capfilt from the lock into its own venv, then
# measures BLIP-large captioner / filter and CLIP ViT-L/14 (random weights, bf16) against the stock
# way, end to end with the local and the Ray runner, ViT FLOP utilisation, GPU idle share, memory.
# Writes its section of docs/benchmarks.md and, when $OUT is set (the device tool), a copy of that
# file, the section and the raw JSON there. Dry run on a CPU: benchmarks/gpu.sh --device cpu --size tiny
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CAPFILT_GPU_VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/capfilt" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet -c requirements.lock pip
    "$VENV/bin/pip" install --quiet -c requirements.lock -e .
fi
OUT=${OUT:-$(mktemp -d)}
nvidia-smi || true
timeout "${CAPFILT_GPU_SECONDS:-480}" "$VENV/bin/python" -m benchmarks.gpu --json "$OUT/gpu.json" "$@"
cp docs/benchmarks.md "$OUT/benchmarks.md"
echo "results in $OUT"
