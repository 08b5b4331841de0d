"""Images to the vision tower's input: pad to square with the mean color, resize, normalize."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import functional as TF

from llava_tune.errors import UserError


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; a missing or unreadable file raises UserError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise UserError(f"image {path} not found") from err
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"image {path} cannot be read ({err}); replace or remove it") from err


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the short side equally on both ends so nothing is cropped away (LLaVA's `pad`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


class ImageProcessor:
    """PIL image -> normalized tensor [3, size, size] for a given vision tower."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = size
        self.mean = tuple(mean)
        self.std = tuple(std)
        # Truncated like LLaVA's expand2square and transformers' LlavaImageProcessor.
        self.fill = tuple(int(255 * m) for m in self.mean)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = expand_to_square(image.convert("RGB"), self.fill)
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)
