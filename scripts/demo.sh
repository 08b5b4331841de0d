#!/usr/bin/env bash
# The embedded demo, on a CPU, no downloads: make the shapes data, train a tiny InternLM2 LM
# on its text, then stage 1 (pretrain: projector only) and stage 2 (finetune: projector +
# QLoRA on the 4-bit LM), evaluating held-out images after each stage, and after stage 2 also
# MMBench-style lettered questions about new images (plain and CircularEval).
#
#   scripts/demo.sh [OUT_DIR]        (default: demo_out/ in the repo, ignored by git)
# Run again, it trains again: its runs are replaced (--overwrite), its export too (--force).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath -m "${1:-$ROOT/demo_out}")"
BIN="$(bash "$ROOT/scripts/setup_env.sh")"
export PATH="$BIN:$PATH" TOKENIZERS_PARALLELISM=false
cd "$ROOT"
START=$SECONDS
step() { echo; echo "== $1 ($(( SECONDS - START ))s so far)"; }

step "1/7 demo data, tokenizer, random tiny LM and vision tower -> $OUT"
python -m llava_tune.demo "$OUT" --train "${DEMO_TRAIN:-6000}" --heldout 200

# bf16 matrix products where this CPU has them natively (AVX512-BF16, AMX), else fp32
PRECISION="train.mixed_precision=$(python -m llava_tune.demo.precision)"
echo "$PRECISION"

step "2/7 train the tiny LM on the demo's text (full training) and save it as InternLM2"
llava-tune train configs/demo/lm.yaml model.llm="$OUT/lm-init" "$PRECISION" \
  data.train="$OUT/shapes/text.json" run_dir="$OUT/lm-train" --overwrite
llava-tune export "$OUT/lm-train" "$OUT/lm" --format internlm2 --force

# The tower is frozen in both stages: its features are computed once per image (stage 1) and
# read back from the cache in stage 2 (data.feature_cache).
VISION=(model.vision.config_file="$OUT/vision/demo-vit.json"
        model.vision.pretrained="$OUT/vision/demo-vit.safetensors"
        data.feature_cache="$OUT/features")
step "3/7 stage 1, pretrain: projector only, on captions"
llava-tune train configs/demo/pretrain.yaml model.llm="$OUT/lm" "${VISION[@]}" "$PRECISION" \
  data.train="$OUT/shapes/pretrain.json" data.image_folder="$OUT/shapes/images" \
  run_dir="$OUT/pretrain" --overwrite

step "4/7 held-out questions after stage 1"
llava-tune eval "$OUT/pretrain" --data "$OUT/shapes/heldout.json" \
  --image-folder "$OUT/shapes/images" --out "$OUT/pretrain/heldout_predictions.jsonl" \
  --json "$OUT/pretrain/heldout_accuracy.json" --batch-size 32

step "5/7 stage 2, finetune: projector + QLoRA (4-bit LM), on image questions"
llava-tune train configs/demo/finetune.yaml model.llm="$OUT/lm" "${VISION[@]}" "$PRECISION" \
  init_from="$OUT/pretrain" data.train="$OUT/shapes/finetune.json" \
  data.image_folder="$OUT/shapes/images" run_dir="$OUT/finetune" --overwrite

step "6/7 held-out questions after stage 2, one at a time and as two-turn conversations"
llava-tune eval "$OUT/finetune" --data "$OUT/shapes/heldout.json" \
  --image-folder "$OUT/shapes/images" --out "$OUT/finetune/heldout_predictions.jsonl" \
  --json "$OUT/finetune/heldout_accuracy.json" --batch-size 32
llava-tune eval "$OUT/finetune" --data "$OUT/shapes/heldout_multiturn.json" \
  --image-folder "$OUT/shapes/images" --out "$OUT/finetune/heldout_multiturn_predictions.jsonl" \
  --json "$OUT/finetune/heldout_multiturn_accuracy.json" --batch-size 32

step "7/7 MMBench-format lettered questions about new images after stage 2 (CircularEval)"
llava-tune eval "$OUT/finetune" --mmbench "$OUT/shapes/heldout_mmbench.tsv" --circular \
  --out "$OUT/finetune/mmbench" --batch-size 32 --max-new-tokens 8

echo
echo "== demo done in $(( SECONDS - START ))s; held-out accuracy:"
python -m llava_tune.demo.report "$OUT"
echo "chat with it: llava-tune chat $OUT/finetune --image $OUT/shapes/images/heldout/000000.png"
