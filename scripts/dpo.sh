#!/usr/bin/env bash
# Stage 3, preference training (stage dpo), after stage 2: the finetune run is the starting
# point and the reference; pairs of a prompt (with its image), a chosen and a rejected answer.
#
#   scripts/dpo.sh demo [DEMO_OUT]   the demo's third stage, on a finished `make demo` (default
#                                    demo_out/): makes pairs about its shapes, trains
#                                    configs/demo/dpo.yaml, prints the held-out reward accuracy
#                                    and exact match before and after
#   scripts/dpo.sh [key=value ...]   the real recipe (configs/internlm2_chat_$SIZE/dpo.yaml);
#                                    edit the paths below or set them in the environment
# Several GPUs: LAUNCH="accelerate launch" scripts/dpo.sh   (see README)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$(bash "$ROOT/scripts/setup_env.sh")"
export PATH="$BIN:$PATH" TOKENIZERS_PARALLELISM=false

if [ "${1:-}" = demo ]; then
  OUT="$(realpath -m "${2:-$ROOT/demo_out}")"
  shift $(( $# >= 2 ? 2 : 1 ))
  if [ ! -f "$OUT/finetune/config.yaml" ]; then
    echo "no finished demo in $OUT (run \`make demo\` or scripts/demo.sh $OUT first)" >&2
    exit 2
  fi
  cd "$ROOT"
  python -m llava_tune.demo.pairs "$OUT/shapes"
  llava-tune train configs/demo/dpo.yaml init_from="$OUT/finetune" model.llm="$OUT/lm" \
    model.vision.config_file="$OUT/vision/demo-vit.json" \
    model.vision.pretrained="$OUT/vision/demo-vit.safetensors" \
    data.feature_cache="$OUT/features" data.train="$OUT/shapes/preference_train.json" \
    data.eval="$OUT/shapes/preference_heldout.json" data.image_folder="$OUT/shapes/images" \
    run_dir="$OUT/dpo" "train.mixed_precision=$(python -m llava_tune.demo.precision)" "$@" \
    --overwrite
  llava-tune eval "$OUT/dpo" --data "$OUT/shapes/heldout.json" \
    --image-folder "$OUT/shapes/images" --out "$OUT/dpo/heldout_predictions.jsonl" \
    --json "$OUT/dpo/heldout_accuracy.json" --batch-size 32
  python -m llava_tune.demo.report "$OUT" --dpo
  exit 0
fi

SIZE="${SIZE:-1_8b}"                                              # 1_8b or 7b
LLM="${LLM:-models/internlm2-chat-${SIZE}}"
VISION="${VISION:-models/clip-vit-large-patch14-336}"           # HF CLIP folder or open_clip file
FINETUNE="${FINETUNE:-runs/internlm2-chat-${SIZE}-finetune}"      # stage 2's run dir
DATA="${DATA:-data/rlaif_v/rlaif_v.jsonl}"                        # preference pairs
IMAGES="${IMAGES:-data/rlaif_v/images}"
RUN="${RUN:-runs/internlm2-chat-${SIZE}-dpo}"
LAUNCH="${LAUNCH:-}"
if [ -n "$LAUNCH" ]; then CMD=($LAUNCH -m llava_tune); else CMD=("$BIN/llava-tune"); fi
"${CMD[@]}" train "$ROOT/configs/internlm2_chat_${SIZE}/dpo.yaml" \
  model.llm="$LLM" model.vision.pretrained="$VISION" init_from="$FINETUNE" \
  data.train="$DATA" data.image_folder="$IMAGES" run_dir="$RUN" "$@"
