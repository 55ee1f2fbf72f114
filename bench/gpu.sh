#!/usr/bin/env bash
# The GPU check of the flex lowering (exactness in bf16/fp16, speed against SDPA's flash kernel at 8K/32K/128K
# tokens), in a few minutes on one GPU. On a machine without one: `bash bench/gpu.sh --device cpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" bench/gpu.py "$@"
