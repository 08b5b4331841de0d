#!/usr/bin/env bash
# Real-size check of the 1.8B recipe on a GPU (see scripts/gpu_check.py); --dry-run anywhere.
#   scripts/gpu_check.sh [--dry-run] [--like internlm2-chat-7b] [--stages pretrain,finetune,sft]
#                        [--steps N] [--report-dir DIR] [--tokenizer DIR] [OUT_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The active virtualenv's Python (as setup_env.sh prefers it), else the checkout's .venv.
if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PY="$VIRTUAL_ENV/bin/python"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" scripts/gpu_check.py "$@"
