#!/usr/bin/env bash
# Make sure a Python environment with llava-tune installed exists; print its bin folder.
# Uses the active virtualenv if it already has llava-tune, else creates ./.venv once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${VIRTUAL_ENV:-}" ] && "$VIRTUAL_ENV/bin/python" -c "import llava_tune" 2>/dev/null; then
  echo "$VIRTUAL_ENV/bin"; exit 0
fi
VENV="${LLAVA_TUNE_VENV:-$ROOT/.venv}"
STAMP="$VENV/.llava-tune-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "setting up $VENV (first run installs torch and friends; a few minutes)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip >&2
  "$VENV/bin/pip" install --quiet -e "$ROOT[test,web,serve]" >&2
  touch "$STAMP"
fi
echo "$VENV/bin"
