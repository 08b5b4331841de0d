"""Peak memory of one forward + backward at InternLM2's vocabulary: plain loss vs ours.

    python scripts/bench_loss.py [--tokens 2048] [--batch 2] [--hidden 256] [--labels all|answers]

A small-hidden Llama (2 layers) with the real vocabulary (92,544) and untied LM head, fp32 on
the CPU (peak RSS of a fresh process per path) or bf16 on a GPU (max_memory_allocated):
- plain: transformers' `model(input_ids, labels=labels).loss` (full [B, T, V] logits);
- ours: `LlavaModel.forward` (models/loss.py: only label positions, chunked, recomputed in
  backward).
`--labels answers` puts labels on 30% of the positions (a LLaVA-like answer share), `all` on
every position (ours then gains from the chunking alone).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VOCAB = 92544


def measure(path: str, tokens: int, batch: int, hidden: int, labels: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llava_tune.constants import IGNORE_INDEX
    from llava_tune.models.llava import LlavaModel
    from llava_tune.training.metrics import peak_rss_mb

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         tie_word_embeddings=False, max_position_embeddings=tokens)
    model = LlamaForCausalLM(config).to(device, dtype)
    ids = torch.randint(3, VOCAB, (batch, tokens), device=device)
    target = ids.clone()
    if labels == "answers":
        target[:, : int(tokens * 0.7)] = IGNORE_INDEX
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_mb() * 2**20
    if path == "plain":
        loss = model(input_ids=ids, labels=target).loss
    else:
        out = LlavaModel(model)(input_ids=ids, labels=target)
        loss = out.loss_sum / out.num_tokens
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_mb() * 2**20 - base
    return {"path": path, "loss": loss.item(), "peak_mb": round(peak / 2**20, 1),
            "device": device}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--labels", choices=["all", "answers"], default="all")
    parser.add_argument("--worker", choices=["plain", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.tokens, args.batch, args.hidden, args.labels)))
        return 0
    results = {}
    for path in ("plain", "ours"):  # each in a fresh process: peak RSS is per process
        out = subprocess.run([sys.executable, __file__, "--worker", path, "--tokens",
                              str(args.tokens), "--batch", str(args.batch), "--hidden",
                              str(args.hidden), "--labels", args.labels],
                             capture_output=True, text=True, check=True)
        results[path] = json.loads(out.stdout.strip().splitlines()[-1])
    plain, ours = results["plain"], results["ours"]
    print(f"{args.batch} x {args.tokens} tokens, vocabulary {VOCAB}, hidden {args.hidden}, "
          f"labels on {args.labels} positions, {plain['device']}")
    print(f"  plain loss: peak {plain['peak_mb']:8.1f} MB   loss {plain['loss']:.5f}")
    print(f"  ours:       peak {ours['peak_mb']:8.1f} MB   loss {ours['loss']:.5f}")
    print(f"  ours / plain: {ours['peak_mb'] / plain['peak_mb']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
