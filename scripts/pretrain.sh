#!/usr/bin/env bash
# Stage 1 of the real recipe: InternLM2-chat + CLIP ViT-L/14-336, projector only.
# Edit the paths below (or set them in the environment), then: scripts/pretrain.sh [key=value ...]
# Several GPUs: LAUNCH="accelerate launch" scripts/pretrain.sh   (see README)
set -euo pipefail
SIZE="${SIZE:-1_8b}"                                              # 1_8b or 7b
LLM="${LLM:-models/internlm2-chat-${SIZE}}"                       # local InternLM2-chat folder
VISION="${VISION:-models/clip-vit-large-patch14-336}"           # HF CLIP folder or open_clip file
DATA="${DATA:-data/llava_pretrain/blip_laion_cc_sbu_558k.json}"   # LLaVA-Pretrain captions
IMAGES="${IMAGES:-data/llava_pretrain/images}"
RUN="${RUN:-runs/internlm2-chat-${SIZE}-pretrain}"
LAUNCH="${LAUNCH:-}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$(bash "$ROOT/scripts/setup_env.sh")"
if [ -n "$LAUNCH" ]; then CMD=($LAUNCH -m llava_tune); else CMD=("$BIN/llava-tune"); fi
PATH="$BIN:$PATH" "${CMD[@]}" train "$ROOT/configs/internlm2_chat_${SIZE}/pretrain.yaml" \
  model.llm="$LLM" model.vision.pretrained="$VISION" \
  data.train="$DATA" data.image_folder="$IMAGES" run_dir="$RUN" "$@"
