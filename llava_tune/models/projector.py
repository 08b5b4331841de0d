"""The projector: vision features into the LLM's embedding space.

Weights live under `model.*` in an nn.Sequential (Linear, GELU, Linear, ...), the layout of
XTuner's ProjectorModel, so keys read `model.0.weight`, `model.2.weight`. Its folder format is
in convert/projector.py. An anyres model's projector also holds `image_newline` [llm_hidden], the
learned token that ends each row of tiles (models/anyres.py), trained with the projector.
"""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """[..., vision_hidden] -> [..., llm_hidden]: Linear, then (GELU, Linear) x (depth - 1)."""

    def __init__(self, vision_hidden: int, llm_hidden: int, depth: int = 2,
                 newline: bool = False) -> None:
        super().__init__()
        self.config = {"vision_hidden_size": vision_hidden, "llm_hidden_size": llm_hidden,
                       "depth": depth}
        layers: list[nn.Module] = [nn.Linear(vision_hidden, llm_hidden)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_hidden, llm_hidden)]
        self.model = nn.Sequential(*layers)
        self.image_newline = None
        if newline:
            # LLaVA-NeXT's initialization: about the scale of one embedding row.
            self.image_newline = nn.Parameter(torch.randn(llm_hidden) / llm_hidden**0.5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features)
