"""The frozen-feature cache: each image's vision-tower features, computed once, reused.

A frozen tower gives the same features for an image every epoch and in every stage that uses
it (stage 1 and stage 2 of a LLaVA recipe share the tower and the images), yet a plain loop
decodes the image and runs the ViT again each time. Here the features (the projector's input,
[N, Dv]) are stored as fp16 safetensors, one file per image:

    CACHE/<tower key>/<2 hex>/<entry key>.safetensors

The tower key digests the tower's weights, its feature layer and the image processing; the
entry key digests the image file's path, size and modification time. A changed image, tower
or processing is a different key (a stale entry is never found); an entry that does not read
back (truncated, garbage) is recomputed when the cache is filled, and dropped (its sample
skipped and counted) if it breaks later.

Sizes: 49 x 128 fp16 values (12 KB) per demo image; 576 x 1024 (1.2 MB) for CLIP ViT-L/14-336,
so about 780 GB for LLaVA's 665K images: turn it on for the real recipe only with that disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from llava_tune.data.image import ImageProcessor, load_image
from llava_tune.errors import UserError
from llava_tune.files import write_bytes_atomic

KEY = "features"


def tower_key(tower: torch.nn.Module, processor: ImageProcessor) -> str:
    """A digest of everything that decides a frozen tower's features for an image file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest.update(repr((getattr(tower, "feature_layer", None), processor.size, processor.mean,
                        processor.std, processor.fill, processor.layout)).encode())
    return digest.hexdigest()[:20]


Item = tuple[Path, str]
"""A file and how it is read (Media kinds: "image", "square", "video")."""


class FeatureCache:
    """Features of image files for one tower: `load(path, kind)` -> [P, N, Dv] fp16, one
    [N, Dv] per tower input (P = 1 for pad; the overview and the tiles for anyres; a video's
    frames). An image read two ways (tiles alone, a square among several) has two entries."""

    def __init__(self, folder: str | os.PathLike, key: str, shape: tuple[int, int]) -> None:
        self.folder = Path(folder) / key
        self.shape = shape
        """(N, Dv) of every tile of every entry: a file of another shape is not trusted."""

    def entry(self, image: Path, kind: str = "image") -> Path:
        stat = image.stat()
        how = "" if kind == "image" else f"|{kind}"  # images keep their keys from before kinds
        digest = hashlib.sha256(
            f"{image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}{how}".encode())
        name = digest.hexdigest()[:32]
        return self.folder / name[:2] / f"{name}.safetensors"

    def _read(self, file: Path) -> torch.Tensor | None:
        try:
            features = load_file(file)[KEY]
        except (SafetensorError, OSError, KeyError, ValueError):
            return None
        return features if features.ndim == 3 and tuple(features.shape[1:]) == self.shape else None

    def load(self, image: Path, kind: str = "image") -> torch.Tensor:
        """The cached features [P, N, Dv] (fp16); a missing or broken entry raises UserError (the
        sample is skipped) after removing the entry, so the next fill recomputes it."""
        file = self.entry(image, kind)
        features = self._read(file)
        if features is None:
            file.unlink(missing_ok=True)
            raise UserError(f"the feature cache entry {file} of image {image} is missing or "
                            "damaged; it is recomputed when the next training starts")
        return features

    def _whole(self, file: Path) -> bool:
        """Whether an entry is whole, from its safetensors header alone (a few hundred bytes,
        not the features: a warm cache of 558K entries is checked in seconds, not by reading
        650 GB): one fp16 tensor [P, N, Dv] of this cache's shape whose bytes end the file."""
        try:
            with open(file, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                if not 0 < size < 1 << 16:
                    return False
                header = json.loads(handle.read(size))
            info = header[KEY]
            shape, (begin, end) = info["shape"], info["data_offsets"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return (info.get("dtype") == "F16" and len(shape) == 3
                and tuple(shape[1:]) == self.shape and begin == 0
                and end == 2 * shape[0] * shape[1] * shape[2]
                and file.stat().st_size == 8 + size + end)

    def missing(self, images: list[Path | Item]) -> list[Item]:
        """Items (an image alone: read as "image") without a whole entry (broken ones are
        removed on the way; one damaged inside its data is found when loaded)."""
        out = []
        for image, kind in map(_item, images):
            file = self.entry(image, kind)
            if not file.is_file() or not self._whole(file):
                file.unlink(missing_ok=True)
                out.append((image, kind))
        return out

    def bytes_for(self, tower_inputs: int) -> int:
        """Disk bytes of an entry of `tower_inputs` tiles or frames (fp16, its header, and
        the filesystem's 4 KiB blocks)."""
        data = 2 * tower_inputs * self.shape[0] * self.shape[1] + 256
        return -(-data // 4096) * 4096

    @torch.no_grad()
    def fill(self, images: list[Path | Item], tower: torch.nn.Module,
             inputs: ImageProcessor | Callable[[Path, str], torch.Tensor],
             batch_size: int = 32, on_progress: Callable[[int, int], None] = lambda d, t: None,
             on_skip: Callable[[Path, str], None] = lambda p, why: None) -> int:
        """Compute and store the features of every image (or video) without a readable
        entry; returns how many were computed. `inputs(path, kind)` makes a file's tower
        inputs [P, 3, S, S] (an ImageProcessor: the image's). An image that cannot be read is
        left out (its samples are skipped when loaded)."""
        if isinstance(inputs, ImageProcessor):
            processor = inputs

            def inputs(path: Path, kind: str) -> torch.Tensor:
                return processor(load_image(path))

        todo = self.missing(images)
        device = next(tower.parameters()).device
        done = 0
        for start in range(0, len(todo), batch_size):
            chunk, pixels = [], []
            for image, kind in todo[start:start + batch_size]:
                try:
                    pixels.append(inputs(image, kind))  # [P, 3, S, S]
                    chunk.append((image, kind))
                except UserError as err:
                    on_skip(image, str(err))
            if chunk:
                features = tower(torch.cat(pixels).to(device)).to("cpu", torch.float16)
                for (image, kind), value in zip(chunk, features.split([len(p) for p in pixels]),
                                                strict=True):
                    file = self.entry(image, kind)
                    file.parent.mkdir(parents=True, exist_ok=True)
                    write_bytes_atomic(file, save({KEY: value.contiguous()}))
                done += len(chunk)
            on_progress(min(start + batch_size, len(todo)), len(todo))
        return done


def _item(image: Path | Item) -> Item:
    return image if isinstance(image, tuple) else (image, "image")
