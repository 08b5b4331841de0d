"""Everything the embedded demo starts from, written into one folder, no downloads.

    python -m llava_tune.demo OUT_DIR [--train N] [--heldout N] [--seed S] [--mcq F] [--multi-turn F]

OUT_DIR/shapes/       the shapes data (data/SHAPES.md) (images, pretrain.json, finetune.json,
                      heldout.json, heldout_multiturn.json, text.json); finetune.json asks
                      each image's two questions as one two-turn conversation and adds
                      lettered-option questions (half with a hint) about some training images;
                      heldout_mmbench.tsv holds MMBench-format questions about new images
                      (llava_tune/demo/mmbench.py)
OUT_DIR/lm-init/      a randomly initialized tiny InternLM2-architecture LM, in InternLM2's own
                      checkpoint layout, with a byte-fallback tokenizer trained on the demo's text
OUT_DIR/vision/       a tiny open_clip ViT config and its (random, frozen) weights, in
                      open_clip's formats (written by llava-tune, without open_clip)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from llava_tune.convert.internlm2 import save_internlm2_checkpoint
from llava_tune.convert.open_clip_format import open_clip_state_dict, vit_config
from llava_tune.demo import mmbench, shapes
from llava_tune.demo import tokenizer as demo_tokenizer
from llava_tune.files import honour_umask
from llava_tune.models.vit import build_vit

LM_SHAPE = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2}
MCQ_FRACTION = 0.5
"""Training images that also get the lettered questions (both kinds)."""
MULTI_TURN = 1.0
"""Training images asked both questions in one two-turn conversation (either order): the chat
answers follow-ups, and an image's tokens are computed once for two answers."""
MCQ_ANSWER = "text"
"""The lettered questions are answered with the option's text: the tiny LM does not learn to
pick the letter (see llava_tune/demo/mmbench.py)."""
VISION_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1},
}
"""The demo's frozen random ViT. It sees the 112-px images at 64 px: 4 x 4 patches, so 16
image tokens per sample instead of 49 at 112 px. Measured on the demo (2-core CPU, the same
282 stage-2 steps): held-out shape accuracy 0.905 with 16 tokens against 0.655 with 49, and
each step about half the tokens; the shapes are large enough to read at 64 px."""


def make_lm(out_dir: Path, data_files: list[Path], seed: int, shape: dict | None = None,
            tokenizer: Path | None = None) -> Path:
    """Tokenizer trained on the demo's text + a random LM (`shape` overrides LM_SHAPE's
    sizes), saved as an InternLM2 checkpoint. `tokenizer`: a folder with a sentencepiece
    tokenizer.model (InternLM2's own) to use instead; the LM gets its vocabulary."""
    vocab_size = 512
    if tokenizer is None:
        tok_dir = out_dir.parent / "tokenizer"
        texts = [text for f in data_files
                 for text in demo_tokenizer.llava_texts(json.loads(f.read_text()))]
        demo_tokenizer.train_tokenizer(texts, tok_dir, vocab_size=vocab_size)
    else:
        import sentencepiece

        tok_dir = tokenizer
        vocab_size = sentencepiece.SentencePieceProcessor(
            model_file=str(tok_dir / "tokenizer.model")).get_piece_size()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=512, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2, **{**LM_SHAPE, **(shape or {})})
    model = LlamaForCausalLM(config)
    # The tokenizer's own files only (a tokenizer folder may hold its model's config.json).
    save_internlm2_checkpoint(model.state_dict(), config, out_dir, sorted(
        p for p in tok_dir.iterdir() if p.name.startswith(("tokenizer", "special_tokens_map"))))
    return out_dir


def make_vision(out_dir: Path, seed: int, config: dict | None = None,
                name: str = "demo-vit") -> tuple[Path, Path]:
    """A ViT config (open_clip's model config JSON; the model's name is its stem) and random
    weights for it: the `visual.*` part of an open_clip state dict, as open_clip's
    create_model(name) would draw them after torch.manual_seed(seed) (the text tower, which
    llava-tune never reads, is left out)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config or VISION_CONFIG
    config_file = out_dir / f"{name}.json"
    config_file.write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = build_vit(vit_config(config, str(config_file)), "cpu")
    weights = out_dir / f"{name}.safetensors"
    save_file(open_clip_state_dict(model), weights)
    honour_umask(weights)  # save_file creates it 0600
    return config_file, weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mcq", type=float, default=MCQ_FRACTION,
                        help="fraction of the training images that also get lettered-option "
                        f"(MMBench-style) color and shape questions (default {MCQ_FRACTION})")
    parser.add_argument("--multi-turn", type=float, default=MULTI_TURN,
                        help="fraction of the training images asked both questions in one "
                        f"two-turn conversation (default {MULTI_TURN})")
    args = parser.parse_args(argv)
    if not 0 <= args.mcq <= 1 or not 0 <= args.multi_turn <= 1:
        parser.error("--mcq and --multi-turn must be in [0, 1]")
    data_dir = args.out_dir / "shapes"
    summary = shapes.generate(data_dir, n_train=args.train, n_heldout=args.heldout, seed=args.seed,
                              multi_turn=args.multi_turn)
    n_mcq = mmbench.add_mcq_to_finetune(data_dir, args.mcq, args.seed, answer=MCQ_ANSWER)
    mmbench.write_shapes_tsv(data_dir / "heldout_mmbench.tsv", args.heldout, args.seed)
    make_lm(args.out_dir / "lm-init", [data_dir / "text.json", data_dir / "pretrain.json",
                                      data_dir / "finetune.json"], args.seed)
    make_vision(args.out_dir / "vision", args.seed)
    print(f"demo inputs in {args.out_dir}: {summary.get('n_train', args.train)} train / "
          f"{summary.get('n_heldout', args.heldout)} held-out images, {n_mcq} lettered "
          f"questions, {args.heldout} MMBench-format held-out images, lm-init/, vision/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
