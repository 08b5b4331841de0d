#!/usr/bin/env bash
# Stage 2 of the real recipe: projector (from stage 1) + QLoRA on the 4-bit InternLM2-chat
# + LoRA on the CLIP tower (XTuner's recipe; train.vision=frozen turns it off).
# Edit the paths below (or set them in the environment), then: scripts/finetune.sh [key=value ...]
# Several GPUs: LAUNCH="accelerate launch" scripts/finetune.sh   (see README)
set -euo pipefail
SIZE="${SIZE:-1_8b}"                                              # 1_8b or 7b
LLM="${LLM:-models/internlm2-chat-${SIZE}}"
VISION="${VISION:-models/clip-vit-large-patch14-336}"           # HF CLIP folder or open_clip file
PRETRAIN="${PRETRAIN:-runs/internlm2-chat-${SIZE}-pretrain}"      # stage 1's run dir
DATA="${DATA:-data/llava_finetune/llava_v1_5_mix665k.json}"       # LLaVA-Instruct mix
IMAGES="${IMAGES:-data/llava_finetune/images}"
RUN="${RUN:-runs/internlm2-chat-${SIZE}-finetune}"
LAUNCH="${LAUNCH:-}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$(bash "$ROOT/scripts/setup_env.sh")"
if [ -n "$LAUNCH" ]; then CMD=($LAUNCH -m llava_tune); else CMD=("$BIN/llava-tune"); fi
PATH="$BIN:$PATH" "${CMD[@]}" train "$ROOT/configs/internlm2_chat_${SIZE}/finetune.yaml" \
  model.llm="$LLM" model.vision.pretrained="$VISION" init_from="$PRETRAIN" \
  data.train="$DATA" data.image_folder="$IMAGES" run_dir="$RUN" "$@"
