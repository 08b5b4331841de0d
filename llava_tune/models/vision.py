"""The vision tower: an open_clip ViT whose patch features from one block feed the projector."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from llava_tune.errors import UserError
from llava_tune.models.clip_convert import open_clip_from_hf_dir


def create_open_clip(name: str, pretrained: str | None = None, config_file: str | None = None) -> nn.Module:
    """The visual part of an open_clip model, frozen and in eval mode.

    `pretrained` is a local weights file (None: random init, for tests and the demo), or a
    Hugging Face CLIP folder (e.g. a download of openai/clip-vit-large-patch14-336); a folder's
    own config.json defines the tower, so `name` and `config_file` are then ignored.
    `config_file` registers a model config JSON first, named after the file's stem.
    """
    import open_clip

    if pretrained is not None and Path(pretrained).is_dir():
        # Any folder goes here: one in neither layout gets an error describing the HF layout.
        return open_clip_from_hf_dir(pretrained)
    if config_file is not None:
        if not Path(config_file).is_file():
            raise UserError(f"vision config file {config_file} not found")
        open_clip.add_model_config(config_file)
    if name not in open_clip.list_models():
        raise UserError(
            f"unknown open_clip model {name!r}; use a name from open_clip.list_models() "
            "(OpenAI weights need the -quickgelu variant, e.g. ViT-L-14-336-quickgelu) "
            "or set model.vision.config_file"
        )
    if pretrained is not None and not Path(pretrained).is_file():
        raise UserError(f"vision tower weights {pretrained} not found; set model.vision.pretrained")
    # open_clip warns about random init, which is what pretrained=None asks for.
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(name, pretrained=pretrained)
    finally:
        logging.disable(logging.NOTSET)
    return model.visual


class VisionTower(nn.Module):
    """Frozen ViT: pixels [B, 3, S, S] -> patch features [B, N, Dv] from block `feature_layer`
    (default -2, the penultimate), CLS token dropped."""

    def __init__(self, visual: nn.Module, feature_layer: int = -2) -> None:
        super().__init__()
        self.visual = visual
        self.feature_layer = feature_layer
        self.requires_grad_(False)
        self.eval()

    @property
    def image_size(self) -> int:
        return self.visual.image_size[0]

    @property
    def num_patches(self) -> int:
        grid = self.visual.grid_size
        return grid[0] * grid[1]

    @property
    def hidden_size(self) -> int:
        return self.visual.transformer.width

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.visual.preprocess_cfg["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.visual.preprocess_cfg["std"])

    def train(self, mode: bool = True) -> VisionTower:
        # Frozen tower: dropout and friends stay off even when the composed model trains.
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.visual.parameters()).dtype
        out = self.visual.forward_intermediates(
            pixel_values.to(dtype), indices=[self.feature_layer], output_fmt="NLC",
            intermediates_only=True,
        )
        return out["image_intermediates"][0]
