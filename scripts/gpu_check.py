"""Real-size check on a GPU: stage 1, stage 2 and text SFT of the 1.8B recipe, ~20 steps each,
with the shipped configs (bf16, 4-bit NF4, gradient checkpointing, up to 2048 tokens), on a
random InternLM2-chat-1.8B and a random CLIP ViT-L/14-336 (nothing is downloaded). Prints, per
stage, peak GPU memory and steady real tokens/s (first log window excluded), and writes
OUT/gpu_check.json.

    python scripts/gpu_check.py [OUT]             (scripts/gpu_check.sh is the same)
    python scripts/gpu_check.py --dry-run [OUT]   # any machine: tiny models, 2 steps, 64 tokens

--like internlm2-chat-7b checks the 7B recipe instead. The tokenizer is InternLM2's real one
when ../shared/fixtures/internlm2-tokenizer exists, else a byte-fallback tokenizer trained on
the generated text (the vocabulary stays 92,544, so logits and memory are the real ones).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "internlm2-tokenizer"
CONFIG_DIRS = {"internlm2-chat-1_8b": "internlm2_chat_1_8b", "internlm2-chat-7b": "internlm2_chat_7b"}


def prepare(out: Path, like: str, dry_run: bool) -> dict[str, Path]:
    """The random LLM, the vision tower (weights file or None), the data; made once."""
    from llava_tune.demo import make, mix
    from llava_tune.demo import tokenizer as demo_tokenizer
    from llava_tune.demo.random_checkpoint import write_checkpoint

    data = out / "data"
    if not (data / "mix.json").is_file():
        mix.generate_mix(data, n_records=64 if dry_run else 800, seed=0,
                         image_size=32 if dry_run else 336)
    lm = out / ("lm-tiny" if dry_run else f"lm-{like}")
    if not (lm / "config.json").is_file():
        tokenizer = REAL_TOKENIZER if (REAL_TOKENIZER / "tokenizer.model").is_file() else None
        if tokenizer is None:
            texts = demo_tokenizer.llava_texts(json.loads((data / "mix.json").read_text()))
            tokenizer = demo_tokenizer.train_tokenizer(texts, out / "tokenizer", 768)
        write_checkpoint("tiny" if dry_run else like, lm, tokenizer=tokenizer)
    text = data / "text.json"  # the text-only records, for the sft stage
    if not text.is_file():
        records = json.loads((data / "mix.json").read_text())
        text.write_text(json.dumps([r for r in records if "image" not in r]))
    paths = {"lm": lm, "data": data / "mix.json", "text": text, "images": data / "images"}
    if dry_run:
        config, weights = make.make_vision(out / "vision", seed=0, config={
            "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64,
                                            "head_width": 32, "patch_size": 16},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1,
                         "layers": 1}}, name="gpu-check-tiny-vit")
        paths.update(vision_config=config, vision_weights=weights)
    return paths


def stage_overrides(stage: str, paths: dict[str, Path], out: Path, dry_run: bool) -> list[str]:
    steps, length = (2, 64) if dry_run else (20, 2048)
    data = paths["text"] if stage == "sft" else paths["data"]
    items = [f"model.llm={paths['lm']}", f"data.train={data}", f"run_dir={out / stage}",
             f"train.max_steps={steps}", f"data.max_length={length}", "train.log_every=1" if
             dry_run else "train.log_every=5", "train.save_every=null", "data.num_workers=2",
             f"data.cache_dir={out / 'cache'}", "data.eval=null"]
    if stage != "sft":
        items.append(f"data.image_folder={paths['images']}")
        if dry_run:
            items += ["model.vision.name=gpu-check-tiny-vit",
                      f"model.vision.config_file={paths['vision_config']}",
                      f"model.vision.pretrained={paths['vision_weights']}"]
        else:
            items.append("model.vision.pretrained=null")  # random ViT-L/14-336: same shapes
    if stage == "finetune":
        items.append(f"init_from={out / 'pretrain'}")
    if dry_run:
        items.append("train.batch_size=2")
    return items


def run_stage(stage: str, config: Path, overrides: list[str], out: Path) -> dict:
    env = {**os.environ, "LLAVA_TUNE_CACHE": str(out / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "llava_tune", "--quiet", "train", str(config),
                             *overrides, "--overwrite"], env=env, cwd=ROOT, text=True,
                            capture_output=True)
    (out / f"{stage}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{stage} failed (exit {result.returncode}); last lines:\n"
                         + "\n".join((result.stdout + result.stderr).splitlines()[-25:]))
    lines = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in lines if "tokens" in r]
    steady = rows[1:] or rows
    return {"stage": stage, "steps": rows[-1]["step"], "wall_s": round(time.time() - start, 1),
            "peak_memory_mb": max(r["memory_mb"] for r in rows),
            "tokens_per_s": round(sum(r["tokens"] for r in steady)
                                  / max(sum(r["seconds"] for r in steady), 1e-9), 1),
            "last_loss": rows[-1]["loss"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny models, 2 steps at 64 tokens, on any machine")
    parser.add_argument("--like", default="internlm2-chat-1_8b", choices=sorted(CONFIG_DIRS))
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --dry-run to check the path on the CPU",
              file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = prepare(out, args.like, args.dry_run)
    configs = ROOT / "configs" / CONFIG_DIRS[args.like]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = [run_stage(stage, configs / f"{stage}.yaml",
                         stage_overrides(stage, paths, out, args.dry_run), out)
               for stage in ("pretrain", "finetune", "sft")]
    report = {"like": args.like, "dry_run": args.dry_run, "device": device,
              "torch": torch.__version__, "stages": results}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.like}{' (dry run: tiny models)' if args.dry_run else ''} on {device}")
    print(f"{'stage':10s} {'steps':>5s} {'peak memory':>12s} {'tokens/s':>10s} {'last loss':>10s}")
    for r in results:
        print(f"{r['stage']:10s} {r['steps']:5d} {r['peak_memory_mb']:9.0f} MB "
              f"{r['tokens_per_s']:10.1f} {r['last_loss']:10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
