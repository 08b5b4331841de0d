"""Scenes that a single padded square image cannot answer: data for any-resolution tiles,
several images per sample and video as frames (the shapes of SHAPES.md, in new settings).

Three kinds, each written by its ``write_*`` function under ``out_dir`` with a train and a
test file (LLaVA JSON; paths relative to ``out_dir``, the image folder):

detail (:func:`write_detail`)
    One small filled shape (side 20-32 px by default) anywhere on a large white image: wide
    448x112, tall 112x448 or square 448x448. Questions: the shapes demo's exact color and
    shape questions. *Proves any-resolution tiles.* The padded square path
    (``model.image_aspect: pad``) pads the image to a square and resizes it to the tower's
    side: a 448x448 image read at 112 px shrinks 4x, the 20-32 px shape to 5-8 px, a few
    pixels whose color blends into the white and whose outline is gone (a wide image is
    padded to 448x448 first, so it shrinks as much). Tiles (``anyres``) cut the image into
    crops of the tower's side after a far smaller resize, so the shape stays whole in one or
    a few of them: with the default grids (up to 2x2, 1x3, 3x1) a 112-px tower reads
    448x448 at 224 px (the shape at 10-16 px) and 448x112 at 336x84; a [4, 4] grid in
    ``model.anyres.grid_pinpoints`` reads 448x448 at full size.

pair (:func:`write_pairs`)
    Two ordinary 112-px shapes images per record (``"image": [a, b]``, two ``<image>``
    markers). Questions: the color of the shape in the *second* image, and whether the two
    shapes are the same shape (yes/no, balanced 50/50). *Proves several images per sample.*
    The answer depends on which image is which, and on comparing them; one image alone, or
    the two merged into one, cannot carry it.

clip (:func:`write_clips`)
    A folder of frames (default 8, 112 px) of one shape, fixed in shape and size with a small
    steady drift, whose color changes once from A to a different B at a frame strictly inside
    the clip (the first frame is A, the last is B). Questions: the color at the end (B) and,
    optionally, at the start (A), with a ``<video>`` marker. *Proves video as frames.* Any
    single frame shows only one of the two colors, and a frame chosen for one question is
    wrong for the other: the model has to read the frames in order.

Each split uses its own random stream derived from the seed (``scenes-detail-train-0``,
``scenes-detail-test-0``, ...), so the output is deterministic for a seed and the test set
does not depend on the number of training samples.

Usage: ``python -m llava_tune.demo.scenes --kind detail|pair|clip --out DIR [--train N]
[--test N] [--seed S]`` (prints the written paths as JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from llava_tune.constants import IMAGE_TOKEN, VIDEO_TOKEN
from llava_tune.demo.shapes import (
    BACKGROUND,
    COLOR_QUESTION,
    COLORS,
    SHAPE_QUESTION,
    SHAPES,
    color_answer,
    draw_shape,
    sample_shape,
    shape_answer,
    shape_mask,
    write_json_atomic,
)

KINDS: tuple[str, ...] = ("detail", "pair", "clip")
"""The three kinds of scenes, as the CLI's ``--kind`` names them."""

DETAIL_SIZES: tuple[tuple[int, int], ...] = ((448, 112), (112, 448), (448, 448))
"""Detail image sizes as (width, height): wide, tall and large square (picked uniformly)."""

DETAIL_SHAPE_SIZE: tuple[float, float] = (20.0, 32.0)
"""Side of the detail shape's box in pixels (uniform in this range)."""

PAIR_COLOR_QUESTION = "What color is the shape in the second image?"
"""Pair question about image b; answered with :func:`shapes.color_answer` of b's color."""

PAIR_SAME_QUESTION = "Are the two shapes the same shape?"
"""Pair question comparing the two images; answered :data:`YES` or :data:`NO`."""

YES = "Yes."
"""Answer to :data:`PAIR_SAME_QUESTION` when both images hold the same shape."""

NO = "No."
"""Answer to :data:`PAIR_SAME_QUESTION` when the shapes differ."""

CLIP_END_QUESTION = "What color is the shape at the end?"
"""Clip question: the color after the change (B)."""

CLIP_START_QUESTION = "What color is the shape at the start?"
"""Clip question: the color before the change (A)."""

CLIP_QUESTIONS: dict[str, str] = {"end": CLIP_END_QUESTION, "start": CLIP_START_QUESTION}
"""The clip questions by the names ``write_clips(questions=...)`` takes."""

CLIP_DRIFT = 1.5
"""Largest drift of the clip's shape per frame, in pixels along each axis."""


# --------------------------------------------------------------------------- drawing


def draw_shape_on(
    width: int,
    height: int,
    shape: str,
    color: str,
    size: float,
    center: tuple[float, float],
) -> Image.Image:
    """Draw one filled shape on a white ``width`` x ``height`` RGB image.

    The geometry is :func:`shapes.shape_mask`'s (on a square canvas the result equals
    :func:`shapes.draw_shape`'s); ``size`` and ``center`` are in pixels, x right, y down.
    """
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; expected one of {tuple(COLORS)}")
    mask = shape_mask(shape, size, center, width, height)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[...] = BACKGROUND
    pixels[mask] = COLORS[color]
    return Image.fromarray(pixels)


def _save(image: Image.Image, path: Path) -> None:
    """Save a PNG fast (the images are flat colors: little to gain from more compression)."""
    image.save(path, format="PNG", compress_level=1)


# --------------------------------------------------------------------------- records


def _record(record_id: str, key: str, media: str | list[str], human: str,
            answer: str) -> dict[str, Any]:
    """Return one single-turn LLaVA record; ``key`` is ``"image"`` or ``"video"``."""
    return {"id": record_id, key: media, "conversations": [
        {"from": "human", "value": human}, {"from": "gpt", "value": answer}]}


def _split_rng(kind: str, split: str, seed: int) -> random.Random:
    """The random stream of one kind's split: ``scenes-{kind}-{split}-{seed}``."""
    return random.Random(f"scenes-{kind}-{split}-{seed}")


def _paths(out: Path, kind: str) -> dict[str, Path]:
    return {"train": out / f"{kind}_train.json", "test": out / f"{kind}_test.json",
            "image_folder": out}


def _check_counts(n_train: int, n_test: int) -> None:
    if n_train < 0 or n_test < 0:
        raise ValueError(f"counts must be >= 0, got n_train={n_train}, n_test={n_test}")


# --------------------------------------------------------------------------- detail


def sample_detail(
    rng: random.Random,
    sizes: Sequence[tuple[int, int]] = DETAIL_SIZES,
    shape_size: tuple[float, float] = DETAIL_SHAPE_SIZE,
) -> dict[str, Any]:
    """Draw one detail image's parameters: ``{"width", "height", "shape", "color", "size",
    "center"}``; the size pair, shape and color uniformly, the side uniform in
    ``shape_size`` and the center uniform such that the box lies inside the image."""
    width, height = sizes[rng.randrange(len(sizes))]
    shape = rng.choice(SHAPES)
    color = rng.choice(tuple(COLORS))
    size = rng.uniform(*shape_size)
    if size > min(width, height):
        raise ValueError(f"shape size {size:.1f} does not fit a {width}x{height} image")
    half = size / 2.0
    center = (rng.uniform(half, width - half), rng.uniform(half, height - half))
    return {"width": width, "height": height, "shape": shape, "color": color, "size": size,
            "center": center}


def detail_records(
    out: Path, split: str, count: int, rng: random.Random,
    sizes: Sequence[tuple[int, int]], shape_size: tuple[float, float],
) -> list[dict[str, Any]]:
    """Write ``count`` detail images under ``out/detail/split`` and return their records:
    a color record and a shape record per image."""
    (out / "detail" / split).mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for index in range(count):
        spec = sample_detail(rng, sizes, shape_size)
        image = f"detail/{split}/{index:06d}.png"
        _save(draw_shape_on(spec["width"], spec["height"], spec["shape"], spec["color"],
                            spec["size"], spec["center"]), out / image)
        base = f"detail-{split}-{index:06d}"
        records.append(_record(f"{base}-color", "image", image,
                               f"{IMAGE_TOKEN}\n{COLOR_QUESTION}", color_answer(spec["color"])))
        records.append(_record(f"{base}-shape", "image", image,
                               f"{IMAGE_TOKEN}\n{SHAPE_QUESTION}", shape_answer(spec["shape"])))
    return records


def write_detail(
    out_dir: str | os.PathLike[str],
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    sizes: Sequence[tuple[int, int]] = DETAIL_SIZES,
    shape_size: tuple[float, float] = DETAIL_SHAPE_SIZE,
) -> dict[str, Path]:
    """Write ``n_train`` + ``n_test`` detail images and their two records each.

    Files: ``out_dir/detail/{train,test}/NNNNNN.png``, ``out_dir/detail_{train,test}.json``.
    Returns ``{"train", "test", "image_folder"}`` (record paths are relative to the last).
    """
    _check_counts(n_train, n_test)
    out = Path(out_dir)
    paths = _paths(out, "detail")
    for split, count in (("train", n_train), ("test", n_test)):
        records = detail_records(out, split, count, _split_rng("detail", split, seed),
                                 sizes, shape_size)
        write_json_atomic(paths[split], records)
    return paths


# --------------------------------------------------------------------------- pair


def pair_records(
    out: Path, split: str, count: int, rng: random.Random, image_size: int,
) -> list[dict[str, Any]]:
    """Write ``count`` image pairs under ``out/pair/split`` and return their records: a
    second-image color record and a same-shape record per pair.

    Exactly ``count // 2`` pairs (one more, by chance, when ``count`` is odd) get b's shape
    forced equal to a's; the others get a different shape, so the yes/no answers are balanced.
    """
    (out / "pair" / split).mkdir(parents=True, exist_ok=True)
    same = [True] * (count // 2) + [False] * (count - count // 2)
    if count % 2:
        same[-1] = rng.random() < 0.5
    rng.shuffle(same)
    records: list[dict[str, Any]] = []
    for index, is_same in enumerate(same):
        a = sample_shape(rng, image_size)
        b = sample_shape(rng, image_size)
        b["shape"] = a["shape"] if is_same else rng.choice(
            [s for s in SHAPES if s != a["shape"]])
        images = [f"pair/{split}/{index:06d}-a.png", f"pair/{split}/{index:06d}-b.png"]
        for spec, image in zip((a, b), images, strict=True):
            _save(draw_shape(spec["shape"], spec["color"], spec["size"], spec["center"],
                             image_size), out / image)
        prefix = f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n"
        base = f"pair-{split}-{index:06d}"
        records.append(_record(f"{base}-color", "image", images,
                               prefix + PAIR_COLOR_QUESTION, color_answer(b["color"])))
        records.append(_record(f"{base}-same", "image", images,
                               prefix + PAIR_SAME_QUESTION, YES if is_same else NO))
    return records


def write_pairs(
    out_dir: str | os.PathLike[str],
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    image_size: int = 112,
) -> dict[str, Path]:
    """Write ``n_train`` + ``n_test`` pairs of shapes images and their two records each.

    Files: ``out_dir/pair/{train,test}/NNNNNN-{a,b}.png``, ``out_dir/pair_{train,test}.json``.
    Returns ``{"train", "test", "image_folder"}`` (record paths are relative to the last).
    """
    _check_counts(n_train, n_test)
    out = Path(out_dir)
    paths = _paths(out, "pair")
    for split, count in (("train", n_train), ("test", n_test)):
        records = pair_records(out, split, count, _split_rng("pair", split, seed), image_size)
        write_json_atomic(paths[split], records)
    return paths


# --------------------------------------------------------------------------- clip


def sample_clip(rng: random.Random, frames: int = 8, image_size: int = 112,
                drift: float = CLIP_DRIFT) -> dict[str, Any]:
    """Draw one clip's parameters: ``{"shape", "size", "colors": (A, B), "change",
    "centers"}``. ``change`` is the first frame in color B, in ``1 .. frames - 1``;
    ``centers`` holds one center per frame, moving by a fixed step of at most ``drift``
    pixels per axis, the shape's box inside the image on every frame."""
    if frames < 2:
        raise ValueError(f"a clip needs at least 2 frames to change color, got {frames}")
    spec = sample_shape(rng, image_size)
    size = spec["size"]
    first = spec["color"]
    second = rng.choice([c for c in COLORS if c != first])
    change = rng.randint(1, frames - 1)
    room = image_size - size  # how far the box can move along an axis
    steps = frames - 1
    half = size / 2.0
    axes = []
    for _ in range(2):
        step = rng.uniform(-drift, drift)
        step = max(-room / steps, min(room / steps, step))
        travel = step * steps
        start = rng.uniform(half + max(0.0, -travel), image_size - half - max(0.0, travel))
        axes.append([start + step * k for k in range(frames)])
    centers = list(zip(axes[0], axes[1], strict=True))
    return {"shape": spec["shape"], "size": size, "colors": (first, second), "change": change,
            "centers": centers}


def clip_records(
    out: Path, split: str, count: int, rng: random.Random, frames: int,
    questions: Sequence[str], image_size: int,
) -> list[dict[str, Any]]:
    """Write ``count`` clips as folders of frames (``NN.png``) under ``out/clip/split`` and
    return their records: one per clip and question in ``questions``."""
    unknown = [q for q in questions if q not in CLIP_QUESTIONS]
    if unknown or not questions:
        raise ValueError(f"questions must be some of {tuple(CLIP_QUESTIONS)}, got {questions!r}")
    records: list[dict[str, Any]] = []
    for index in range(count):
        spec = sample_clip(rng, frames, image_size)
        folder = f"clip/{split}/{index:06d}"
        (out / folder).mkdir(parents=True, exist_ok=True)
        first, second = spec["colors"]
        for frame, center in enumerate(spec["centers"]):
            color = first if frame < spec["change"] else second
            _save(draw_shape(spec["shape"], color, spec["size"], center, image_size),
                  out / folder / f"{frame:02d}.png")
        answers = {"end": second, "start": first}
        for name in questions:
            records.append(_record(f"clip-{split}-{index:06d}-{name}", "video", folder,
                                   f"{VIDEO_TOKEN}\n{CLIP_QUESTIONS[name]}",
                                   color_answer(answers[name])))
    return records


def write_clips(
    out_dir: str | os.PathLike[str],
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    frames: int = 8,
    questions: Sequence[str] = ("end",),
    image_size: int = 112,
) -> dict[str, Path]:
    """Write ``n_train`` + ``n_test`` clips (folders of ``frames`` PNG frames) and their
    records (``questions``: ``("end",)`` or ``("end", "start")``).

    Files: ``out_dir/clip/{train,test}/NNNNNN/NN.png``, ``out_dir/clip_{train,test}.json``
    (records ``"video": "clip/train/NNNNNN"``). Returns ``{"train", "test",
    "image_folder"}`` (record paths are relative to the last).
    """
    _check_counts(n_train, n_test)
    out = Path(out_dir)
    paths = _paths(out, "clip")
    for split, count in (("train", n_train), ("test", n_test)):
        (out / "clip" / split).mkdir(parents=True, exist_ok=True)
        records = clip_records(out, split, count, _split_rng("clip", split, seed), frames,
                               tuple(questions), image_size)
        write_json_atomic(paths[split], records)
    return paths


WRITERS = {"detail": write_detail, "pair": write_pairs, "clip": write_clips}
"""The writer of each kind."""


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m llava_tune.demo.scenes --kind detail|pair|clip --out DIR [--train N]
    [--test N] [--seed S]``: write one kind's data and print its paths as JSON."""
    parser = argparse.ArgumentParser(
        description="Write scenes for tiles (detail), several images (pair) or video (clip).")
    parser.add_argument("--kind", required=True, choices=KINDS, help="which scenes to write")
    parser.add_argument("--out", required=True, help="output folder (the image folder)")
    parser.add_argument("--train", type=int, default=1000,
                        help="training images / pairs / clips (default 1000)")
    parser.add_argument("--test", type=int, default=200,
                        help="test images / pairs / clips (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if min(args.train, args.test) < 0:
        parser.error("--train and --test must be >= 0")
    paths = WRITERS[args.kind](args.out, args.train, args.test, args.seed)
    print(json.dumps({name: str(path) for name, path in paths.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
