"""The projector: vision features into the LLM's embedding space.

Weights live under `model.*` in an nn.Sequential (Linear, GELU, Linear, ...), the layout of
XTuner's ProjectorModel, so keys read `model.0.weight`, `model.2.weight`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llava_tune.errors import UserError
from llava_tune.files import atomic_dir


class Projector(nn.Module):
    """[..., vision_hidden] -> [..., llm_hidden]: Linear, then (GELU, Linear) x (depth - 1)."""

    def __init__(self, vision_hidden: int, llm_hidden: int, depth: int = 2) -> None:
        super().__init__()
        self.config = {"vision_hidden_size": vision_hidden, "llm_hidden_size": llm_hidden,
                       "depth": depth}
        layers: list[nn.Module] = [nn.Linear(vision_hidden, llm_hidden)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_hidden, llm_hidden)]
        self.model = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features)

    def save(self, directory: str | Path) -> None:
        """config.json + model.safetensors; the folder appears complete or not at all."""
        with atomic_dir(directory) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                      tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps(self.config, indent=2))

    def load(self, directory: str | Path) -> None:
        """Load weights saved by `save`; a shape that does not fit names both shapes."""
        file = Path(directory) / "model.safetensors"
        if not file.is_file():
            raise UserError(f"projector weights {file} not found; is this a llava-tune run dir?")
        state = load_file(file)
        own = self.state_dict()
        for key, value in state.items():
            if key not in own or own[key].shape != value.shape:
                expected = tuple(own[key].shape) if key in own else "no such key"
                raise UserError(
                    f"projector {file}: {key} has shape {tuple(value.shape)}, this model expects "
                    f"{expected}; the projector was trained for another vision tower or LLM"
                )
        missing = set(own) - set(state)
        if missing:
            raise UserError(f"projector {file} lacks {sorted(missing)}; its depth differs from the config")
        self.load_state_dict(state)
