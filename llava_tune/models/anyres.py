"""How an image becomes tokens: one padded square (LLaVA-1.5's `pad`), or LLaVA-NeXT's
any-resolution tiles (`anyres`), and the packing of the tiles' features.

anyres, as LLaVA-NeXT does it (and transformers' LlavaNext, which an export must match):
1. Of the allowed grids (rows x cols tiles of the tower's input size S), take the one that
   keeps most of the image's pixels, then wastes least (`best_resolution`).
2. The image is resized into that grid's canvas keeping its aspect ratio, centered on black,
   and cut into rows x cols tiles of S x S; an overview (the whole image squashed to S x S)
   comes first. The tower encodes every tile: (1 + rows * cols) x P x P patch features.
3. The tiles' features form one (rows * P) x (cols * P) map, the padding's rows or columns
   are cut off again (`unpadded_size`), and a learned `image_newline` ends every row of it,
   so the LLM reads where a row ends. The overview's P x P features go first.
4. OneVision caps the map (`anyres_max_N`): over 1.1 x N tiles' worth of features, it is
   pooled (bilinear) down to about N tiles' worth (`pool_max`).

A video is `video_frames` frames, each one square tower input whose P x P features are pooled
(bilinear, OneVision's 2 x 2) to ceil(P / 2) x ceil(P / 2); the frames' tokens follow each
other, and an anyres model ends them with one `image_newline` (as OneVision does).

All geometry is integer arithmetic on (height, width) pairs, so the dataset can count an
image's tokens from its header before any pixel is decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Size = tuple[int, int]
"""(height, width) in pixels."""


def best_resolution(image: Size, resolutions: list[Size]) -> Size:
    """The canvas (height, width) of `resolutions` an image fits best: most of its pixels
    kept after scaling it into the canvas (never counted above its own), ties broken by the
    least wasted canvas. The first of equal candidates wins (as transformers' own)."""
    height, width = image
    best, best_kept, best_waste = resolutions[0], -1, math.inf
    for canvas_h, canvas_w in resolutions:
        scale = min(canvas_w / width, canvas_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = canvas_h * canvas_w - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (canvas_h, canvas_w), kept, waste
    return best


def fitted_size(image: Size, canvas: Size) -> Size:
    """The image's size once resized into `canvas` keeping its aspect ratio (one side fills
    the canvas, the other is rounded up, never past it)."""
    height, width = image
    canvas_h, canvas_w = canvas
    # The scale as a float first, then the product: ceil(150 * (224 / 200)) is 169, and
    # transformers' processor (whose tiles an export must reproduce) rounds that way.
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


def unpadded_size(image: Size, features: Size) -> Size:
    """The part of a feature map of size `features` that covers the image (not its padding):
    the padding is cut equally from both ends, by whole rows or columns."""
    height, width = image
    rows, cols = features
    if width / height > cols / rows:
        content = int(round(height * cols / width, 7))
        pad = (rows - content) // 2
        return rows - 2 * pad, cols
    content = int(round(width * rows / height, 7))
    pad = (cols - content) // 2
    return rows, cols - 2 * pad


def pooled_size(size: Size, patches: int, pool_max: int | None) -> Size:
    """OneVision's cap: a map of more than 1.1 x pool_max tiles' worth of features
    (patches x patches each) shrinks by the ratio that brings it to pool_max tiles."""
    rows, cols = size
    if pool_max is None:
        return size
    ratio = math.sqrt(rows * cols / (pool_max * patches**2))
    if ratio <= 1.1:
        return size
    return int(rows // ratio), int(cols // ratio)


@dataclass(frozen=True)
class Media:
    """One visual item of a sample, as the model needs to know it: an image of `size`
    (height, width; (0, 0) when pad does not need it), a "square" (an anyres model's image
    read as one padded square plus a newline, as OneVision reads each of several images), or
    a video of `frames` frames."""

    kind: str = "image"
    size: Size = (0, 0)
    frames: int = 0


@dataclass(frozen=True)
class ImageLayout:
    """How images become tokens for one tower: its input side `tile` (pixels) and `patches`
    per side; `grids` (rows, cols) empty means `pad` (one square, patches^2 tokens)."""

    tile: int
    patches: int
    grids: tuple[Size, ...] = ()
    pool_max: int | None = None
    """OneVision's anyres_max_N (None: never pooled)."""
    video_frames: int = 8
    """Frames sampled from each video (data.video_frames)."""
    video_pool: int = 2
    """Each frame's feature map is pooled by this factor per side (model.video_pool)."""
    multi_image: str = "tiles"
    """anyres with several images in a sample: "tiles" each (LLaVA-NeXT), or "square", one
    padded square plus a newline each (OneVision)."""

    def kind_of_images(self, count: int) -> str:
        """The Media kind of each image in a sample of `count` images."""
        return "square" if self.anyres and count > 1 and self.multi_image == "square" else "image"

    @property
    def anyres(self) -> bool:
        return bool(self.grids)

    @property
    def resolutions(self) -> list[Size]:
        """The grids' canvases in pixels, (height, width), as transformers' grid_pinpoints."""
        return [(rows * self.tile, cols * self.tile) for rows, cols in self.grids]

    @property
    def largest(self) -> Size:
        """The largest canvas (height, width): an image above it in both sides is scaled down."""
        return max(self.resolutions, key=lambda hw: hw[0] * hw[1])

    def grid(self, image: Size) -> Size:
        """(rows, cols) of tiles for an image of size (height, width)."""
        canvas_h, canvas_w = best_resolution(image, self.resolutions)
        return canvas_h // self.tile, canvas_w // self.tile

    def scales_down(self, image: Size) -> bool:
        """Whether the image is larger than its best grid, so its tiles hold it scaled down."""
        canvas_h, canvas_w = best_resolution(image, self.resolutions)
        return canvas_w / image[1] < 1 or canvas_h / image[0] < 1

    def num_tiles(self, image: Size | None = None) -> int:
        """Tower inputs for an image: 1 for pad; the overview plus rows * cols for anyres."""
        if not self.anyres:
            return 1
        rows, cols = self.grid(image)
        return 1 + rows * cols

    def feature_map(self, image: Size) -> Size:
        """(rows, cols) of the tiles' feature map once unpadded and pooled (anyres)."""
        rows, cols = self.grid(image)
        size = unpadded_size(image, (rows * self.patches, cols * self.patches))
        return pooled_size(size, self.patches, self.pool_max)

    def video_tokens(self) -> int:
        """Tokens a video takes: its frames' pooled maps, plus the newline that ends them
        (anyres models, which have one)."""
        side = math.ceil(self.patches / self.video_pool)
        return self.video_frames * side * side + int(self.anyres)

    def inputs(self, media: Media) -> int:
        """Tower inputs of one item: its tiles, its square, or its frames."""
        if media.kind == "video":
            return media.frames
        return 1 if media.kind == "square" else self.num_tiles(media.size)

    def tokens(self, media: Media) -> int:
        """Tokens of one item in the LLM's input."""
        if media.kind == "video":
            return self.video_tokens()
        if media.kind == "square":
            return self.patches**2 + 1
        return self.num_tokens(media.size)

    def num_tokens(self, image: Size | None = None) -> int:
        """Tokens an image of size (height, width) takes in the LLM's input."""
        base = self.patches**2
        if not self.anyres:
            return base
        rows, cols = self.feature_map(image)
        return base + rows * (cols + 1)  # +1: the newline that ends each row


def pack_features(features: torch.Tensor, image: Size, layout: ImageLayout,
                  newline: torch.Tensor) -> torch.Tensor:
    """One anyres image's projected features [1 + rows*cols, P*P, D] (overview first, tiles
    row by row) -> its tokens [layout.num_tokens(image), D]: the overview, then the unpadded
    (and maybe pooled) map row by row, each row ended by `newline` [D]."""
    p = layout.patches
    rows, cols = layout.grid(image)
    overview, tiles = features[0], features[1:]
    dim = features.shape[-1]
    if tiles.shape[0] != rows * cols:
        raise ValueError(f"an image of {image[1]} x {image[0]} pixels takes {rows} x {cols} "
                         f"tiles, but {tiles.shape[0]} tiles' features were given")
    # [rows, cols, P, P, D] -> [D, rows * P, cols * P]: tile rows then patch rows, likewise cols.
    grid = tiles.view(rows, cols, p, p, dim).permute(4, 0, 2, 1, 3).reshape(dim, rows * p, cols * p)
    height, width = unpadded_size(image, (rows * p, cols * p))
    top, left = (rows * p - height) // 2, (cols * p - width) // 2
    grid = grid[:, top:top + height, left:left + width]
    pooled = pooled_size((height, width), p, layout.pool_max)
    if pooled != (height, width):
        grid = F.interpolate(grid[None], list(pooled), mode="bilinear")[0]
    ends = newline.to(grid.dtype)[:, None, None].expand(dim, grid.shape[1], 1)
    grid = torch.cat([grid, ends], dim=2).flatten(1).transpose(0, 1)
    return torch.cat([overview, grid])


def pool_frames(features: torch.Tensor, layout: ImageLayout,
                newline: torch.Tensor | None) -> torch.Tensor:
    """A video's projected features [F, P*P, D] -> its tokens [layout.video_tokens(), D]:
    each frame's map pooled bilinearly to ceil(P / video_pool) per side, the frames in turn,
    then `newline` (when the model has one)."""
    frames, _, dim = features.shape
    p = layout.patches
    side = math.ceil(p / layout.video_pool)
    maps = features.view(frames, p, p, dim).permute(0, 3, 1, 2)
    pooled = F.interpolate(maps, size=[side, side], mode="bilinear")
    tokens = pooled.permute(0, 2, 3, 1).reshape(frames * side * side, dim)
    if newline is None:
        return tokens
    return torch.cat([tokens, newline.to(tokens.dtype)[None]])
