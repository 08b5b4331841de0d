"""The vision tower: llava-tune's CLIP ViT (models/vit.py: open_clip-compatible, built without
open_clip) whose patch features from one block feed the projector."""

from __future__ import annotations

import torch
from torch import nn

from llava_tune.models.vit import ClipViT

VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")
"""Every Linear of the tower's attention and MLP (XTuner's recipe: LoRA on all of them)."""


class VisionTower(nn.Module):
    """ViT: pixels [B, 3, S, S] -> patch features [B, N, Dv] from block `feature_layer`
    (default -2, the penultimate), CLS token dropped.

    Frozen unless a stage makes some of its parameters trainable (LoRA or full); a frozen tower
    runs without autograd and stays in eval mode. `visual` is the ClipViT, or a PEFT model
    wrapping it when the tower has a LoRA.
    """

    def __init__(self, visual: ClipViT, feature_layer: int = -2) -> None:
        super().__init__()
        visual.block_index(feature_layer)  # IndexError now, not at the first image
        self.visual = visual
        self.feature_layer = feature_layer
        self.requires_grad_(False)
        self.eval()

    @property
    def base(self) -> ClipViT:
        """The ClipViT, under a LoRA wrapper if the tower has one."""
        visual = self.visual
        return visual.get_base_model() if hasattr(visual, "get_base_model") else visual

    @property
    def image_size(self) -> int:
        return self.base.image_size

    @property
    def num_patches(self) -> int:
        return self.base.grid_size ** 2

    @property
    def hidden_size(self) -> int:
        return self.base.transformer.width

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.base.mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.base.std)

    @property
    def trains(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> VisionTower:
        # A frozen tower keeps dropout and friends off even when the composed model trains.
        return super().train(mode and self.trains)

    @property
    def blocks_run(self) -> int:
        """Transformer blocks an image goes through: those up to the feature layer."""
        return self.base.block_index(self.feature_layer) + 1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.visual.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains):
            # The base module's forward: LoRA layers sit inside it, PEFT's wrapper adds nothing.
            return self.base(pixel_values.to(dtype), self.feature_layer)
