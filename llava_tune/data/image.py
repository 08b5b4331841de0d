"""Images to the vision tower's input: one square padded with the mean color (`pad`), or
LLaVA-NeXT's overview + tiles (`anyres`, geometry in models/anyres.py); resized, normalized."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import functional as TF

from llava_tune.errors import UserError
from llava_tune.models.anyres import ImageLayout, Size, best_resolution, fitted_size


def image_size(path: str | Path | BinaryIO, name: str | None = None) -> Size:
    """(height, width) of an image file from its header (no pixel is decoded); a missing or
    unreadable file raises UserError naming it (`name`: what to call an open file, such as a
    member of a .tar shard)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError as err:
        raise UserError(f"image {name or path} not found") from err
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"image {name or path} cannot be read ({err}); replace or remove it") \
            from err
    return height, width


def load_image(path: str | Path | BinaryIO, name: str | None = None) -> Image.Image:
    """Open an image as RGB; a missing or unreadable file raises UserError naming it (`name`:
    what to call an open file, such as a member of a .tar shard)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise UserError(f"image {name or path} not found") from err
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"image {name or path} cannot be read ({err}); replace or remove it") \
            from err


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
    """PIL image -> normalized tower inputs [T, 3, size, size]: T = 1 padded square, or (with
    an anyres `layout`) the overview and the tiles, row by row."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float],
                 layout: ImageLayout | None = None) -> None:
        self.size = size
        self.mean = tuple(mean)
        self.std = tuple(std)
        # Truncated like LLaVA's expand2square and transformers' LlavaImageProcessor.
        self.fill = tuple(int(255 * m) for m in self.mean)
        self.layout = layout if layout is not None and layout.anyres else None

    def _normalize(self, image: Image.Image) -> torch.Tensor:
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.layout is None:
            return self.square(image)
        return torch.stack([self._normalize(tile) for tile in self.tiles(image.convert("RGB"))])

    def square(self, image: Image.Image) -> torch.Tensor:
        """[1, 3, size, size]: the image padded to a square with the mean color (LLaVA-1.5's
        pad, and how OneVision reads each of several images)."""
        square = expand_to_square(image.convert("RGB"), self.fill)
        return self._normalize(square.resize((self.size, self.size), Image.Resampling.BICUBIC))[None]

    def frames(self, frames: list[Image.Image]) -> torch.Tensor:
        """A video's frames -> [F, 3, size, size], each squashed to the square (as OneVision's
        video processor does: no padding, no tiles)."""
        size = (self.size, self.size)
        return torch.stack([self._normalize(frame.convert("RGB").resize(
            size, Image.Resampling.BICUBIC)) for frame in frames])

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        """anyres: the image squashed to one tile (the overview), then its best grid's tiles.
        The grid's canvas holds the image resized to fit, centered on black (LLaVA-NeXT's and
        transformers' LlavaNextImageProcessor's padding), and is cut row by row."""
        size = self.size
        canvas_h, canvas_w = best_resolution((image.height, image.width), self.layout.resolutions)
        fit_h, fit_w = fitted_size((image.height, image.width), (canvas_h, canvas_w))
        canvas = Image.new("RGB", (canvas_w, canvas_h), (0, 0, 0))
        canvas.paste(image.resize((fit_w, fit_h), Image.Resampling.BICUBIC),
                     ((canvas_w - fit_w) // 2, (canvas_h - fit_h) // 2))
        overview = image.resize((size, size), Image.Resampling.BICUBIC)
        return [overview] + [canvas.crop((x, y, x + size, y + size))
                             for y in range(0, canvas_h, size) for x in range(0, canvas_w, size)]
