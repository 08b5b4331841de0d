"""Estimate the GPU memory of the real-size recipes (an estimate, not a measurement).

    python scripts/estimate_memory.py [CONFIG ...]     (default: configs/internlm2_chat_*/*.yaml)

Counts parameters on the meta device (nothing is allocated) and adds up, per GPU:
4-bit linear weights at ~0.53 bytes/parameter (NF4 + double-quantized scales), embeddings and
LM head in bf16, the vision tower in fp32, 16 bytes per trainable parameter (fp32 weight,
gradient, two Adam moments), checkpointed activations (one bf16 hidden state per layer per
token, plus one layer's recomputation) and the logits of one loss chunk (llava_tune/models/
loss.py: at most DEFAULT_CHUNK label tokens' logits live at a time, in bf16, their fp32 upcast,
its gradient and the bf16 gradient), for a full batch at the sequence length the stage needs. A tower that trains (train.vision
lora or full) adds its LoRA (or all its weights) to the trainable parameters and its own
checkpointed activations (one image per sample, every token of it incl. CLS, times the tiles
of the largest grid for anyres: data.max_length must hold them for the LLM); a frozen tower
runs without autograd and keeps none. CUDA context and fragmentation (typically 1-2 GB) come
on top.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from llava_tune.assembly.trainable import vision_lora_config
from llava_tune.config import load_config
from llava_tune.constants import STAGES
from llava_tune.convert.internlm2 import internlm2_to_llama_config
from llava_tune.convert.open_clip_format import open_clip_vit_config
from llava_tune.models.loss import DEFAULT_CHUNK
from llava_tune.models.vit import ClipViT, build_vit
from llava_tune.stages import has_vision, vision_mode

ROOT = Path(__file__).resolve().parents[1]
GB = 2**30
INTERNLM2 = {  # published config.json values
    "1_8b": {"num_hidden_layers": 24, "hidden_size": 2048, "num_attention_heads": 16,
             "num_key_value_heads": 8, "intermediate_size": 8192},
    "7b": {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336},
}


def vision_tower(config) -> tuple[int, int, int]:
    """(parameters, width, image tokens) of the config's vision tower, built on meta."""
    visual = _visual(config)
    return sum(p.numel() for p in visual.parameters()), visual.transformer.width, visual.grid_size ** 2


def _visual(config) -> ClipViT:
    vision = config.model.vision
    return build_vit(open_clip_vit_config(vision.name, vision.config_file), "meta")


def vision_training(config, images: int) -> tuple[int, int]:
    """(trainable parameters, activation bytes) the tower adds when it trains, else (0, 0)."""
    mode = vision_mode(config)
    if mode not in ("lora", "full"):
        return 0, 0
    visual = _visual(config)
    blocks = visual.transformer.resblocks
    width, layers = visual.transformer.width, len(blocks)
    mlp = blocks[0].mlp.c_fc.out_features
    if mode == "full":
        trainable = sum(p.numel() for p in visual.parameters())
    else:
        targets = vision_lora_config(config.train.vision_lora).target_modules
        sizes = {"q_proj": (width, width), "k_proj": (width, width), "v_proj": (width, width),
                 "out_proj": (width, width), "c_fc": (width, mlp), "c_proj": (mlp, width)}
        trainable = layers * sum(config.train.vision_lora.r * sum(sizes[t]) for t in targets)
    tokens = images * (visual.grid_size ** 2 + 1)
    activations = tokens * width * 2 * (layers + 8) + tokens * mlp * 2 * 3
    return trainable, activations


def tower_inputs(config) -> int:
    """Tower inputs per image at most: 1 for pad; anyres's overview plus its largest grid."""
    if config.model.image_aspect != "anyres":
        return 1
    anyres = config.model.anyres
    return 1 + max(r * c for r, c in anyres.grid_pinpoints
                   if anyres.max_tiles is None or r * c <= anyres.max_tiles)


def estimate(config_file: Path) -> dict[str, float]:
    config = load_config(config_file)
    size = config_file.parent.name.removeprefix("internlm2_chat_")
    cfg = internlm2_to_llama_config({"model_type": "internlm2", "vocab_size": 92544,
                                     "rope_theta": 1000000, "bias": False, **INTERNLM2[size]})
    with torch.device("meta"):
        llm = LlamaForCausalLM(cfg)
    embed = 2 * cfg.vocab_size * cfg.hidden_size
    linear = sum(p.numel() for p in llm.parameters()) - embed - cfg.hidden_size * (2 * cfg.num_hidden_layers + 1)
    bytes_per_linear = 0.53 if config.model.quantization == "4bit" else 2
    weights = linear * bytes_per_linear + embed * 2
    vision = has_vision(config)
    vision_params, vision_width, image_tokens = vision_tower(config) if vision else (0, 0, 0)
    trainable = 0
    if vision:
        h = cfg.hidden_size
        trainable += vision_width * h + h + h * h + h
    mode = config.train.llm or STAGES[config.stage].llm
    if mode == "lora":
        r = config.train.lora.r
        per_layer = sum(r * (m.in_features + m.out_features) for m in llm.model.layers[0].modules()
                        if isinstance(m, torch.nn.Linear))
        trainable += per_layer * cfg.num_hidden_layers
    elif mode == "full":
        trainable += linear + embed
    # A preference pair is two rows (prompt + chosen, prompt + rejected); its images go
    # through the tower once.
    rows = config.train.batch_size * (2 if config.stage == "dpo" else 1)
    tokens = rows * (image_tokens + 64 if config.stage == "pretrain" else config.data.max_length)
    activations = tokens * cfg.hidden_size * 2 * (cfg.num_hidden_layers + 8) \
        + tokens * cfg.intermediate_size * 2 * 3
    if vision:
        tower_trainable, tower_activations = vision_training(
            config, config.train.batch_size * tower_inputs(config))
        trainable += tower_trainable
        activations += tower_activations
    # The chunked loss: one chunk of label tokens' logits at a time, never the whole batch's.
    logits = min(tokens, DEFAULT_CHUNK) * cfg.vocab_size * (2 + 4 + 4 + 2)
    parts = {"weights": weights + vision_params * 4,
             "trainable": trainable * 16, "activations": activations, "logits": logits}
    return {k: v / GB for k, v in parts.items()} | {"total": sum(parts.values()) / GB}


def main() -> None:
    files = [Path(a) for a in sys.argv[1:]] or sorted(ROOT.glob("configs/internlm2_chat_*/*.yaml"))
    print(f"{'config':50s} {'weights':>8s} {'train':>8s} {'activ.':>8s} {'logits':>8s} {'total':>8s}  (GB, estimates)")
    for file in files:
        e = estimate(file)
        name = str(file.relative_to(ROOT)) if file.is_absolute() else str(file)
        print(f"{name:50s} {e['weights']:8.1f} {e['trainable']:8.1f} {e['activations']:8.1f} "
              f"{e['logits']:8.1f} {e['total']:8.1f}")


if __name__ == "__main__":
    main()
