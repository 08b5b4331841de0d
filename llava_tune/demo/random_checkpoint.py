"""A random-init InternLM2 checkpoint in the hub's layout, for real-size runs without downloads.

    python scripts/make_random_checkpoint.py --like internlm2-chat-1_8b OUT [--tokenizer DIR]
    (or python -m llava_tune.demo.random_checkpoint ...)

OUT gets config.json (InternLM2's published config for that size: remote-code layout,
`model_type: internlm2`), safetensors shards of at most --shard-gb with an index, as the hub
has them (keys `model.tok_embeddings`, `model.layers.N.attention.wqkv`, ..., `output`), and
with --tokenizer DIR the tokenizer files found there (e.g. ../shared/fixtures/internlm2-tokenizer).
Weights are drawn one tensor at a time (normal, std 0.02; norms 1), so memory stays about one
shard, not the model. `--like tiny` writes a 2-layer model of the same layout in a second.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from llava_tune.convert.weights import save_safetensors
from llava_tune.files import atomic_dir

SIZES = {
    # FACTS.md: the published configs of internlm/internlm2-chat-1_8b and -7b.
    "internlm2-chat-1_8b": {"hidden_size": 2048, "intermediate_size": 8192,
                            "num_hidden_layers": 24, "num_attention_heads": 16,
                            "num_key_value_heads": 8},
    "internlm2-chat-7b": {"hidden_size": 4096, "intermediate_size": 14336,
                          "num_hidden_layers": 32, "num_attention_heads": 32,
                          "num_key_value_heads": 8},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def internlm2_config(like: str, vocab_size: int = 92544) -> dict:
    shape = SIZES[like]
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM"},
        "attn_implementation": "eager", "bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 32768, "model_type": "internlm2", "rms_norm_eps": 1e-05,
        "rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 1000000,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": vocab_size, **shape,
    }


def tensor_shapes(cfg: dict):
    """(key, shape, is_norm) of every tensor of an InternLM2 checkpoint, in file order."""
    c, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = c // heads
    yield "model.tok_embeddings.weight", (vocab, c), False
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "attention.wqkv.weight", ((heads + 2 * kv) * d, c), False
        yield p + "attention.wo.weight", (c, heads * d), False
        yield p + "feed_forward.w1.weight", (inter, c), False
        yield p + "feed_forward.w3.weight", (inter, c), False
        yield p + "feed_forward.w2.weight", (c, inter), False
        yield p + "attention_norm.weight", (c,), True
        yield p + "ffn_norm.weight", (c,), True
    yield "model.norm.weight", (c,), True
    yield "output.weight", (vocab, c), False


def write_checkpoint(like: str, out: Path, tokenizer: Path | None = None, dtype: str = "bf16",
                     shard_gb: float = 2.0, seed: int = 0, device: str = "cpu") -> Path:
    """Write the checkpoint (atomically); returns `out`. `device="cuda"` draws the weights on
    the GPU (other values than the CPU's for a seed): one CPU core draws about 100M a second,
    so 7B takes minutes there and seconds on a GPU."""
    cfg = internlm2_config(like)
    generator = torch.Generator(device).manual_seed(seed)
    limit = int(shard_gb * 2**30)
    with atomic_dir(out) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        names: list[str] = []
        weight_map: dict[str, int] = {}
        for key, shape, is_norm in tensor_shapes(cfg):
            tensor = (torch.ones(shape) if is_norm else
                      torch.randn(shape, generator=generator, device=device).mul_(0.02)
                      ).to(DTYPES[dtype]).cpu()
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > limit:
                names.append(_flush(shards[-1], tmp, len(names)))
                shards[-1], size = {}, 0
            shards[-1][key] = tensor
            weight_map[key] = len(names)
            size += nbytes
        names.append(_flush(shards[-1], tmp, len(names)))
        total = len(names)
        final = []
        for i, name in enumerate(names):
            target = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            (tmp / name).rename(tmp / target)
            final.append(target)
        index = {"metadata": {"total_size": sum((tmp / f).stat().st_size for f in final)},
                 "weight_map": {k: final[i] for k, i in weight_map.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if tokenizer is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer / name).is_file():
                    shutil.copy2(tokenizer / name, tmp / name)
    return out


def _flush(tensors: dict[str, torch.Tensor], folder: Path, number: int) -> str:
    name = f"shard-{number}.tmp.safetensors"
    save_safetensors(tensors, folder / name)
    tensors.clear()
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--like", required=True, choices=sorted(SIZES))
    parser.add_argument("--tokenizer", type=Path, help="folder with InternLM2's tokenizer.model")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tokenizer is not None and not (args.tokenizer / "tokenizer.model").is_file():
        parser.error(f"--tokenizer {args.tokenizer} has no tokenizer.model")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} exists and is not empty; choose a new folder")
    write_checkpoint(args.like, args.out, args.tokenizer, args.dtype, args.shard_gb, args.seed)
    print(f"wrote a random {args.like} checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
