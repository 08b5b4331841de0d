#!/usr/bin/env bash
# Text-only fine-tuning (stage sft): LoRA/QLoRA/full on an LLM, no vision tower.
#
#   scripts/sft_text.sh LLM_DIR DATA_FILE OUT_DIR [key=value ...]
#
# DATA_FILE: JSON/JSONL in OpenAI (messages), XTuner (conversation), Alpaca or LLaVA format.
# CONFIG picks the recipe (default: InternLM2-chat-1.8B QLoRA); for the demo's tiny LM use
# CONFIG=configs/demo/sft.yaml. Extra key=value arguments pass to `llava-tune train`.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,10p' "$0"; exit 2
fi
LLM="$1"; DATA="$2"; OUT="$3"; shift 3
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${CONFIG:-$ROOT/configs/internlm2_chat_1_8b/sft.yaml}"
BIN="$(bash "$ROOT/scripts/setup_env.sh")"
"$BIN/llava-tune" train "$CONFIG" model.llm="$LLM" data.train="$DATA" run_dir="$OUT" "$@"
echo "chat with it: llava-tune chat $OUT"
