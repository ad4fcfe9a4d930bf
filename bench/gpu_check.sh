#!/usr/bin/env bash
# GPU checks, run from the repository root on a CUDA machine: bash bench/gpu_check.sh
# Relation module at B = 1024 over W = 1 and 8 workers, fp32 and bf16 (docs/global-batch.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
for dtype in fp32 bf16; do
  "$PY" bench/relation_scale.py --device cuda --dtype "$dtype" --batches 1024 --workers 1 8 \
    --max-before-gb 60
done
