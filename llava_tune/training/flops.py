"""Model FLOPs of a training step, the LLM's and the vision side's apart, counted from the
model's shapes and how each part trains (the numbers behind metrics.jsonl's flops_per_token_*,
tflops and mfu).

Model FLOPs are the matrix products a step needs, not what the hardware happens to run:

- A Linear of N weights costs 2N FLOPs per token forward. Its backward costs 2N for its input's
  gradient when anything before it trains, and 2N for its weights' gradient when they train.
  So a trained part costs 6N per token; a frozen part that gradients pass through 4N (the
  frozen LLM of pretrain, on the way back to the projector; the base weights under LoRA); a
  frozen part with nothing trainable before it 2N, forward only (a frozen vision tower); a part
  that does not run nothing (the tower, when data.feature_cache holds its features). LoRA's
  own matrices train: 6 per weight.
- Attention's own products (scores, and their use on the values) cost 4·n·d FLOPs per token
  and layer forward, for a sequence of n tokens (d = heads x head dim), 12·n·d with their
  backward: all n keys, as PaLM's MFU counts them, not a causal kernel's half. n is each
  sample's own length: the samples of a packed row never attend to each other
  (data/collate.py), so a row costs the sum of its samples' squares, not its length squared;
  padding costs nothing.
- The LM head runs on the label tokens alone (models/loss.py): hidden x vocab weights for each
  token that carries a loss, not for every token.
- Not counted: norms, activations, softmax, rotary embeddings, the embedding lookup (no
  product), the loss itself, the optimizer, 4-bit dequantization, biases, and the second
  forward of gradient checkpointing (hardware FLOPs: MFU counts the model's, so the
  recomputation's time lowers it, as time spent on no new result should).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from llava_tune.config import Config
from llava_tune.data.collate import Batch
from llava_tune.models.llava import LlavaModel, unwrap_causal_lm
from llava_tune.models.vision import VisionTower
from llava_tune.stages import llm_mode, vision_mode


@dataclass(frozen=True)
class LLMShape:
    """What a token passes through in a Llama-layout decoder (InternLM2 loads as one)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> LLMShape:
        """From a transformers config (LlamaConfig and the like)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size,
                   intermediate=config.intermediate_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=head_dim, vocab=config.vocab_size)

    @property
    def attention_width(self) -> int:
        """d of the attention products: the query heads' width (grouped keys change the
        projections' size, not the number of scores)."""
        return self.heads * self.head_dim

    @property
    def layer_weights(self) -> int:
        """Weights of one decoder layer's products: q and o (hidden x heads·head_dim), k and v
        (hidden x kv_heads·head_dim), the gated MLP's three (hidden x intermediate)."""
        attention = 2 * self.hidden * self.attention_width + 2 * self.hidden * self.kv_heads * self.head_dim
        return attention + 3 * self.hidden * self.intermediate

    @property
    def head_weights(self) -> int:
        return self.hidden * self.vocab


@dataclass(frozen=True)
class TowerShape:
    """What one tower input (a pad image, an anyres tile, a video frame) passes through in an
    open_clip ViT, up to the feature layer."""

    blocks: int
    """Blocks run: those up to the feature layer (the tower stops there)."""
    width: int
    mlp_width: int
    patch: int
    patches: int
    """Patches per input; the tokens are these and the class token."""
    channels: int = 3

    @classmethod
    def from_tower(cls, tower: VisionTower) -> TowerShape:
        base = tower.base
        first = base.transformer.resblocks[0]
        patch = base.conv1.kernel_size[0]
        return cls(blocks=tower.blocks_run, width=base.transformer.width,
                   mlp_width=first.mlp.c_fc.out_features, patch=patch,
                   patches=tower.num_patches, channels=base.conv1.in_channels)

    @property
    def tokens(self) -> int:
        return self.patches + 1

    @property
    def block_weights(self) -> int:
        """q, k, v and out (width x width), the MLP's two (width x mlp_width)."""
        return 4 * self.width * self.width + 2 * self.width * self.mlp_width

    @property
    def patch_weights(self) -> int:
        """The patch embedding: a convolution applied once per patch."""
        return self.channels * self.patch * self.patch * self.width


FORWARD, INPUT_GRAD, WEIGHT_GRAD = 2, 2, 2
"""FLOPs per weight per token of a matrix product's forward, of its input's gradient and of
its weights' gradient."""


def per_weight(trains: bool, gradient_passes: bool) -> int:
    """FLOPs per weight per token of a part: forward, plus each gradient it needs."""
    return FORWARD + INPUT_GRAD * gradient_passes + WEIGHT_GRAD * trains


@dataclass(frozen=True)
class StepCost:
    """FLOPs of a model's training steps: the shapes, and how each part trains."""

    llm: LLMShape
    llm_mode: str
    """frozen, lora or full (stages.llm_mode)."""
    llm_lora: int = 0
    """LoRA weights on the decoder's layers."""
    tower: TowerShape | None = None
    tower_mode: str | None = None
    """frozen, lora or full; None: no tower (stage sft)."""
    tower_lora: int = 0
    """LoRA weights on the tower blocks that run."""
    projector_in: int = 0
    """Weights of the projector's first product (its input: the tower's features)."""
    projector_rest: int = 0
    """Weights of its other products (a gradient always passes them, to the first's weights)."""

    def llm_flops(self, lengths: list[int], label_tokens: int) -> float:
        """FLOPs of the LLM on samples of these real `lengths` (a packed row's samples apart)
        with `label_tokens` tokens that carry a loss. The LLM is always backpropagated
        through: something in it (LoRA, full) or before it (the projector) trains."""
        tokens = sum(lengths)
        full = self.llm_mode == "full"
        linear = per_weight(full, True) * self.llm.layers * self.llm.layer_weights * tokens
        lora = per_weight(True, True) * self.llm_lora * tokens
        head = per_weight(full, True) * self.llm.head_weights * label_tokens
        attention = 3 * 4 * self.llm.layers * self.llm.attention_width * sum(n * n for n in lengths)
        return float(linear + lora + head + attention)

    def vision_flops(self, inputs: int, tower_runs: bool = True) -> float:
        """FLOPs of the tower and the projector on `inputs` tower inputs (tiles, frames);
        `tower_runs=False` when the features come from the feature cache."""
        if self.tower is None or not inputs:
            return 0.0
        t, trains = self.tower, self.tower_mode in ("lora", "full")
        projector = (per_weight(True, trains) * self.projector_in
                     + per_weight(True, True) * self.projector_rest) * t.patches
        if not tower_runs:
            return float(inputs * projector)
        full = self.tower_mode == "full"
        # The patch embedding sees pixels: no gradient goes back past it.
        patch = per_weight(full, False) * t.patch_weights * t.patches
        blocks = per_weight(full, trains) * t.blocks * t.block_weights * t.tokens
        lora = per_weight(True, True) * self.tower_lora * t.tokens
        attention = (3 if trains else 1) * 4 * t.blocks * t.width * t.tokens * t.tokens
        return float(inputs * (patch + blocks + lora + attention + projector))

    def of_batch(self, batch: Batch) -> tuple[float, float]:
        """(LLM FLOPs, vision FLOPs) of one micro-batch's forward and backward."""
        if batch.pixel_values is not None:
            vision = self.vision_flops(batch.pixel_values.shape[0])
        elif batch.image_features is not None:
            vision = self.vision_flops(batch.image_features.shape[0], tower_runs=False)
        else:
            vision = 0.0
        return self.llm_flops(batch.sample_lengths, batch.num_label_tokens), vision


_BLOCK = re.compile(r"resblocks\.(\d+)\.")


def lora_weights(module: nn.Module, below_block: int | None = None) -> int:
    """LoRA's weights in `module`; with `below_block`, only those of tower blocks before it."""
    total = 0
    for name, param in module.named_parameters():
        if "lora_" not in name:
            continue
        block = _BLOCK.search(name)
        if below_block is not None and block is not None and int(block.group(1)) >= below_block:
            continue
        total += param.numel()
    return total


def step_cost(model: LlavaModel, config: Config) -> StepCost:
    """The FLOPs counter of `model` (its LoRA adapters in place) trained as `config` says."""
    llm = unwrap_causal_lm(model.llm)
    llm_config = llm.config
    tower, tower_shape, tower_lora, matrices = model.vision, None, 0, []
    if tower is not None:
        tower_shape = TowerShape.from_tower(tower)
        tower_lora = lora_weights(tower, below_block=tower_shape.blocks)
    if model.projector is not None:  # its Linears in order (the newline vector is no product)
        matrices = [m.weight.numel() for m in model.projector.modules() if isinstance(m, nn.Linear)]
    return StepCost(llm=LLMShape.from_config(llm_config), llm_mode=llm_mode(config),
                    llm_lora=lora_weights(model.llm), tower=tower_shape,
                    tower_mode=vision_mode(config) if tower is not None else None,
                    tower_lora=tower_lora, projector_in=sum(matrices[:1]),
                    projector_rest=sum(matrices[1:]))
