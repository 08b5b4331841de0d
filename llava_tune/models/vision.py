"""The vision tower: an open_clip ViT whose patch features from one block feed the projector.

open_clip's attention packs q, k and v into one `in_proj` of nn.MultiheadAttention. The tower
unpacks it into four nn.Linear (`q_proj`, `k_proj`, `v_proj`, `out_proj`: the same function,
exactly), so that a LoRA on the tower has one adapter per projection, module for module like
transformers' CLIPVisionModel, which XTuner's published `visual_encoder_adapter/` targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")
"""Every Linear of the tower's attention and MLP (XTuner's recipe: LoRA on all of them)."""


class SplitAttention(nn.Module):
    """nn.MultiheadAttention (batch first, self-attention) with q, k, v as separate Linears.

    Called like nn.MultiheadAttention by open_clip's blocks: (q_x, k_x, v_x [B, T, D],
    need_weights=False, attn_mask=None or an additive float mask) -> ([B, T, D], None).
    """

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        width, self.num_heads = attention.embed_dim, attention.num_heads
        weight, bias = attention.in_proj_weight, attention.in_proj_bias
        like = {"device": weight.device, "dtype": weight.dtype}
        self.q_proj, self.k_proj, self.v_proj = (
            nn.Linear(width, width, bias=bias is not None, **like) for _ in range(3))
        self.out_proj = nn.Linear(width, width, bias=attention.out_proj.bias is not None, **like)
        if not weight.is_meta:  # a tower built on the meta device has no values to copy
            with torch.no_grad():
                for i, linear in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                    linear.weight.copy_(weight[i * width:(i + 1) * width])
                    if bias is not None:
                        linear.bias.copy_(bias[i * width:(i + 1) * width])
                self.out_proj.load_state_dict(attention.out_proj.state_dict())
        for param in self.parameters():
            param.requires_grad_(attention.in_proj_weight.requires_grad)

    def forward(self, q_x: torch.Tensor, k_x: torch.Tensor, v_x: torch.Tensor,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None):
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            # nn.MultiheadAttention's bool masks mean "masked", SDPA's mean "keep".
            raise ValueError("SplitAttention takes additive float masks, not bool masks")
        batch, length, width = q_x.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, D/H]
            return x.view(batch, x.shape[1], self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(q_x)), heads(self.k_proj(k_x)),
                                             heads(self.v_proj(v_x)), attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width)), None


def split_attention(visual: nn.Module) -> nn.Module:
    """Replace every nn.MultiheadAttention in `visual`'s blocks by a SplitAttention (in place)."""
    for block in visual.transformer.resblocks:
        if isinstance(block.attn, nn.MultiheadAttention):
            block.attn = SplitAttention(block.attn)
    return visual


class VisionTower(nn.Module):
    """ViT: pixels [B, 3, S, S] -> patch features [B, N, Dv] from block `feature_layer`
    (default -2, the penultimate), CLS token dropped.

    Frozen unless a stage makes some of its parameters trainable (LoRA or full); a frozen tower
    runs without autograd and stays in eval mode.
    """

    def __init__(self, visual: nn.Module, feature_layer: int = -2) -> None:
        super().__init__()
        self.visual = split_attention(visual)
        self.feature_layer = feature_layer
        self.requires_grad_(False)
        self.eval()

    @property
    def base(self) -> nn.Module:
        """The open_clip VisionTransformer, under a LoRA wrapper if the tower has one."""
        visual = self.visual
        return visual.get_base_model() if hasattr(visual, "get_base_model") else visual

    @property
    def image_size(self) -> int:
        return self.base.image_size[0]

    @property
    def num_patches(self) -> int:
        grid = self.base.grid_size
        return grid[0] * grid[1]

    @property
    def hidden_size(self) -> int:
        return self.base.transformer.width

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.base.preprocess_cfg["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.base.preprocess_cfg["std"])

    @property
    def trains(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> VisionTower:
        # A frozen tower keeps dropout and friends off even when the composed model trains.
        return super().train(mode and self.trains)

    @property
    def blocks_run(self) -> int:
        """Transformer blocks an image goes through: those up to the feature layer."""
        layers = len(self.base.transformer.resblocks)
        return self.feature_layer + 1 if self.feature_layer >= 0 else layers + self.feature_layer + 1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.visual.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains):
            # stop_early: the blocks after the feature layer (the last one, for layer -2) would
            # run for an output nobody reads.
            out = self.base.forward_intermediates(
                pixel_values.to(dtype), indices=[self.feature_layer], output_fmt="NLC",
                intermediates_only=True, stop_early=True,
            )
        return out["image_intermediates"][0]
