"""Generate the embedded demo's data: the shapes task (rules in data/SHAPES.md).

One RGB image per sample (white background, one filled shape of one of six colors), plus
LLaVA-format JSON files for the two training stages, a held-out evaluation set and a
text-only corpus for training the demo's tiny language model and tokenizer.

Layout written by :func:`generate` under ``out_dir``::

    images/train/000000.png ...      training images
    images/heldout/000000.png ...    held-out images (own random stream)
    pretrain.json                    stage 1: one caption record per training image
    finetune.json                    stage 2: a color and a shape question per training image,
                                     as two records or (``multi_turn``) one two-turn record
    heldout.json                     the two evaluated questions per held-out image
    heldout_multiturn.json           the same two questions as one two-turn conversation per
                                     held-out image, in alternating order (follow-up questions)
    text.json                        text-only records (no image) in the demo's language

Image paths inside the JSON files are relative to ``out_dir/images``.

Usage: ``python -m llava_tune.demo.shapes OUT_DIR [--train N] [--heldout N] [--seed S] [--image-size 112]``

(Over 400 lines on purpose: SHAPES.md's rules, the drawing and the data files are one spec;
splitting them would scatter it.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from llava_tune.constants import IMAGE_TOKEN
from llava_tune.files import write_text_atomic

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
"""The four shapes, in the order used for sampling."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 170),
    "orange": (245, 130, 30),
}
"""Color names and their exact RGB values (SHAPES.md)."""

BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""Image background color."""

SIZE_RANGE: tuple[float, float] = (0.4, 0.8)
"""Shape size s as a fraction of the image side (uniform)."""

COLOR_QUESTION = "What color is the shape?"
"""The evaluated color question (exact form)."""

SHAPE_QUESTION = "What shape is this?"
"""The evaluated shape question (exact form)."""

COLOR_PARAPHRASES: tuple[str, ...] = (
    "Which color does the shape have?",
    "What is the color of the shape?",
    "What color is it?",
    "Tell me the color of the shape.",
)
"""Training-only paraphrases of the color question."""

SHAPE_PARAPHRASES: tuple[str, ...] = (
    "Which shape is shown?",
    "What shape do you see?",
    "What kind of shape is this?",
    "Name the shape in the picture.",
)
"""Training-only paraphrases of the shape question."""

EXACT_QUESTION_PROB = 0.5
"""Probability that a finetune record uses the exact (evaluated) question form."""

CAPTION_INSTRUCTIONS: tuple[str, ...] = (
    "",
    "Describe the image briefly.",
    "What is in the picture?",
    "Give a short caption.",
    "Describe what you see.",
)
"""Instructions that may follow ``<image>\\n`` in a caption record ("" = none)."""

GENERIC_PROMPTS: tuple[str, ...] = (
    "Say something.",
    "Tell me a fact.",
    "Write a sentence.",
    "Hello!",
)
"""Human turns of the generic (non-shape) text records."""

GENERIC_SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How can I help you today?",
    "The sun rises in the east and sets in the west.",
    "Water boils at 100 degrees Celsius at sea level.",
    "There are 7 days in a week and 12 months in a year.",
    "Please answer the question in one short sentence.",
    "I am a small language model trained on a tiny corpus.",
    "Cats and dogs are common pets in many homes.",
    "Reading a good book is a nice way to spend an evening.",
    "The river flows slowly through the quiet green valley.",
    "She bought three apples, two pears and a loaf of bread.",
    "Thank you for your question; here is my answer.",
    "Mathematics is the study of numbers, shapes and patterns.",
    "It was a cold and windy day in the middle of winter.",
    "Good morning, everyone. Let's get started.",
    "Can you see the picture? Yes, I can see it clearly.",
)
"""Ordinary English sentences so that the tokenizer and LM see more than the task's words."""

SCENE_FORMS: tuple[str, ...] = (
    "{color} {shape}",
    "a {color} {shape}",
    "The picture shows a {color} {shape}.",
    "Scene: {color} {shape}.",
    "{shape}, {color}",
)
"""How a text record describes the scene before its first question."""

MULTI_TURN_PROB = 0.2
"""Fraction of shape-language text records with two question/answer turns."""

GENERIC_FRACTION = 0.05
"""Fraction of text records that hold a generic sentence."""


# --------------------------------------------------------------------------- text forms


def caption(color: str, shape: str) -> str:
    """Return the stage-1 caption, e.g. ``"A red circle."``."""
    return f"A {color} {shape}."


def color_answer(color: str) -> str:
    """Return the answer to the color question, e.g. ``"It is red."``."""
    return f"It is {color}."


def shape_answer(shape: str) -> str:
    """Return the answer to the shape question, e.g. ``"It is a circle."``."""
    return f"It is a {shape}."


# --------------------------------------------------------------------------- images


def shape_polygon(
    shape: str, size: float, center: tuple[float, float]
) -> list[tuple[float, float]]:
    """Return the vertices of a triangle or star (pixel coordinates, y down).

    triangle: (cx, cy - s/2), (cx - s/2, cy + s/2), (cx + s/2, cy + s/2).
    star: ten vertices alternating outer radius s/2 and inner radius s/5, the first one
    straight up from the center.
    """
    cx, cy = center
    half = size / 2.0
    if shape == "triangle":
        return [(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)]
    if shape == "star":
        outer, inner = size / 2.0, size / 5.0
        points = []
        for k in range(10):
            angle = -math.pi / 2.0 + k * math.pi / 5.0
            radius = outer if k % 2 == 0 else inner
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"no polygon for shape {shape!r}")


def _inside_polygon(
    xs: np.ndarray, ys: np.ndarray, polygon: Sequence[tuple[float, float]]
) -> np.ndarray:
    """Even-odd point-in-polygon test for arrays of points (vectorized crossing number)."""
    inside = np.zeros(np.broadcast(xs, ys).shape, dtype=bool)
    n = len(polygon)
    for i in range(n):
        x0, y0 = polygon[i]
        x1, y1 = polygon[(i + 1) % n]
        if y0 == y1:
            continue
        crosses = (y0 > ys) != (y1 > ys)
        x_at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < x_at)
    return inside


def shape_mask(
    shape: str,
    size: float,
    center: tuple[float, float],
    image_size: int = 112,
    height: int | None = None,
) -> np.ndarray:
    """Return the boolean ``[height, image_size]`` mask of the shape (row = y, col = x).

    ``image_size`` is the canvas width and ``height`` its height (default: the width, a
    square canvas). A pixel belongs to the shape when its center ``(x + 0.5, y + 0.5)`` lies
    inside the shape's geometry (no anti-aliasing).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    xs = (np.arange(image_size, dtype=np.float64) + 0.5)[None, :]
    ys = (np.arange(image_size if height is None else height, dtype=np.float64) + 0.5)[:, None]
    cx, cy = center
    half = size / 2.0
    if shape == "circle":
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= half * half
    elif shape == "square":
        mask = (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    else:
        mask = _inside_polygon(xs, ys, shape_polygon(shape, size, center))
    return mask


def draw_shape(
    shape: str,
    color: str,
    size: float,
    center: tuple[float, float],
    image_size: int = 112,
) -> Image.Image:
    """Draw one filled shape on a white ``image_size`` x ``image_size`` RGB image.

    Args:
        shape: one of :data:`SHAPES`.
        color: one of the keys of :data:`COLORS`.
        size: the side s of the shape's bounding box, in pixels.
        center: ``(cx, cy)`` of the bounding box, in pixels (x right, y down).
        image_size: side of the square image.
    """
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; expected one of {tuple(COLORS)}")
    mask = shape_mask(shape, size, center, image_size)
    pixels = np.empty((image_size, image_size, 3), dtype=np.uint8)
    pixels[...] = BACKGROUND
    pixels[mask] = COLORS[color]
    return Image.fromarray(pixels)


def sample_shape(rng: random.Random, image_size: int = 112) -> dict[str, Any]:
    """Draw one sample's parameters, uniformly as in SHAPES.md.

    Returns ``{"shape", "color", "size", "center"}``: size in pixels, uniform in
    ``[0.4, 0.8] * image_size``; center uniform such that the s x s box lies inside the image.
    """
    shape = rng.choice(SHAPES)
    color = rng.choice(tuple(COLORS))
    size = rng.uniform(SIZE_RANGE[0] * image_size, SIZE_RANGE[1] * image_size)
    half = size / 2.0
    cx = rng.uniform(half, image_size - half)
    cy = rng.uniform(half, image_size - half)
    return {"shape": shape, "color": color, "size": size, "center": (cx, cy)}


# --------------------------------------------------------------------------- records


def _turns(human: str, gpt: str) -> list[dict[str, str]]:
    """Return one human/gpt exchange in LLaVA's conversation format."""
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def caption_record(
    record_id: str, image: str, color: str, shape: str, instruction: str
) -> dict[str, Any]:
    """Return a stage-1 caption record (human turn: ``<image>\\n`` + optional instruction)."""
    return {
        "id": record_id,
        "image": image,
        "conversations": _turns(f"{IMAGE_TOKEN}\n{instruction}", caption(color, shape)),
    }


def question_record(record_id: str, image: str, question: str, answer: str) -> dict[str, Any]:
    """Return a single-turn image question record."""
    return conversation_record(record_id, image, [(question, answer)])


def conversation_record(
    record_id: str, image: str, exchanges: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """Return one image conversation of several (question, answer) turns; the image marker
    goes before the first question only, as a chat user attaches the image once."""
    conversations: list[dict[str, str]] = []
    for turn, (question, answer) in enumerate(exchanges):
        conversations += _turns(f"{IMAGE_TOKEN}\n{question}" if turn == 0 else question, answer)
    return {"id": record_id, "image": image, "conversations": conversations}


def _pick_question(rng: random.Random, exact: str, paraphrases: Sequence[str]) -> str:
    """Pick the exact form with probability :data:`EXACT_QUESTION_PROB`, else a paraphrase."""
    if rng.random() < EXACT_QUESTION_PROB:
        return exact
    return rng.choice(tuple(paraphrases))


def text_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Return ``n`` text-only LLaVA records (no ``image`` key, no ``<image>``) in the demo's language.

    Most records are caption-style (instruction -> ``A red circle.``) or QA-style
    (question -> ``It is red.`` / ``It is a circle.``) for random (color, shape) pairs, some
    with two turns; about :data:`GENERIC_FRACTION` hold an ordinary English sentence. The
    first human turn starts with a description of the scene (where an image goes later) and
    the answers follow it: the language model learns to read its answer from the context, so
    that in stage 1 the projector only has to make image features read like that description.
    """
    rng = random.Random(f"shapes-text-{seed}")
    n_generic = min(len(GENERIC_SENTENCES), int(round(n * GENERIC_FRACTION))) if n > 0 else 0
    kinds = ["generic"] * n_generic + ["task"] * (n - n_generic)
    rng.shuffle(kinds)
    generic = list(GENERIC_SENTENCES)
    rng.shuffle(generic)
    instructions = [i for i in CAPTION_INSTRUCTIONS if i]
    color_questions = (COLOR_QUESTION, *COLOR_PARAPHRASES)
    shape_questions = (SHAPE_QUESTION, *SHAPE_PARAPHRASES)
    records: list[dict[str, Any]] = []
    for index, kind in enumerate(kinds):
        if kind == "generic":
            conversations = _turns(rng.choice(GENERIC_PROMPTS), generic.pop())
        else:
            color = rng.choice(tuple(COLORS))
            shape = rng.choice(SHAPES)
            exchanges = [
                (rng.choice(instructions), caption(color, shape)),
                (rng.choice(color_questions), color_answer(color)),
                (rng.choice(shape_questions), shape_answer(shape)),
            ]
            rng.shuffle(exchanges)
            n_turns = 2 if rng.random() < MULTI_TURN_PROB else 1
            conversations = []
            for human, gpt in exchanges[:n_turns]:
                conversations.extend(_turns(human, gpt))
            scene = rng.choice(SCENE_FORMS).format(color=color, shape=shape)
            conversations[0]["value"] = f"{scene}\n{conversations[0]['value']}"
        records.append({"id": f"text-{index:06d}", "conversations": conversations})
    return records


# --------------------------------------------------------------------------- files


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temp file beside it, then rename)."""
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")


def _render_to_file(job: tuple[str, dict[str, Any], int]) -> None:
    """Render one sample and save it as PNG (a top-level function so that it pickles)."""
    path, spec, image_size = job
    image = draw_shape(
        spec["shape"], spec["color"], spec["size"], tuple(spec["center"]), image_size
    )
    image.save(path, format="PNG", compress_level=1)


def _render_all(jobs: list[tuple[str, dict[str, Any], int]], workers: int) -> None:
    """Render and save all images, in a process pool when ``workers > 1``."""
    if workers > 1 and len(jobs) > 1:
        from multiprocessing import get_context

        with get_context("spawn").Pool(workers) as pool:
            pool.map(_render_to_file, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
    else:
        for job in jobs:
            _render_to_file(job)


def generate(
    out_dir: str | os.PathLike[str],
    n_train: int = 2000,
    n_heldout: int = 200,
    seed: int = 0,
    image_size: int = 112,
    workers: int = 1,
    n_text: int = 4000,
    multi_turn: float = 0.0,
) -> dict[str, Any]:
    """Generate the shapes dataset under ``out_dir`` (layout in the module docstring).

    ``multi_turn`` is the fraction of training images whose color and shape questions form one
    two-turn conversation (either order, chosen at random) instead of two records: a chat
    answers follow-up questions about its image only if it trained on some.

    The training images, the held-out images, the training text choices and the text-only
    corpus each use their own random stream derived from ``seed``, so the held-out set does
    not depend on ``n_train`` and the output does not depend on ``workers``.

    Returns a summary: counts per file, the paths written (as strings) and the seconds taken.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    image_root = out / "images"
    splits = {"train": n_train, "heldout": n_heldout}
    specs: dict[str, list[dict[str, Any]]] = {}
    jobs: list[tuple[str, dict[str, Any], int]] = []
    for split, count in splits.items():
        (image_root / split).mkdir(parents=True, exist_ok=True)
        rng = random.Random(f"shapes-{split}-{seed}")
        specs[split] = [sample_shape(rng, image_size) for _ in range(count)]
        for index, spec in enumerate(specs[split]):
            jobs.append((str(image_root / split / f"{index:06d}.png"), spec, image_size))
    _render_all(jobs, workers)

    if not 0 <= multi_turn <= 1:
        raise ValueError(f"multi_turn must be in [0, 1], got {multi_turn}")
    text_rng = random.Random(f"shapes-train-text-{seed}")
    # Its own stream: multi_turn=0 writes the same single-turn records as before it existed.
    turn_rng = random.Random(f"shapes-train-turns-{seed}")
    pretrain: list[dict[str, Any]] = []
    finetune: list[dict[str, Any]] = []
    for index, spec in enumerate(specs["train"]):
        image = f"train/{index:06d}.png"
        base = f"train-{index:06d}"
        color, shape = spec["color"], spec["shape"]
        pretrain.append(
            caption_record(base, image, color, shape, text_rng.choice(CAPTION_INSTRUCTIONS))
        )
        color_q = _pick_question(text_rng, COLOR_QUESTION, COLOR_PARAPHRASES)
        shape_q = _pick_question(text_rng, SHAPE_QUESTION, SHAPE_PARAPHRASES)
        exchanges = [(color_q, color_answer(color)), (shape_q, shape_answer(shape))]
        if turn_rng.random() < multi_turn:
            if turn_rng.random() < 0.5:
                exchanges.reverse()
            finetune.append(conversation_record(f"{base}-both", image, exchanges))
        else:
            for kind, (question, answer) in zip(("color", "shape"), exchanges, strict=True):
                finetune.append(question_record(f"{base}-{kind}", image, question, answer))
    heldout: list[dict[str, Any]] = []
    heldout_multiturn: list[dict[str, Any]] = []
    for index, spec in enumerate(specs["heldout"]):
        image = f"heldout/{index:06d}.png"
        base = f"heldout-{index:06d}"
        exchanges = [(COLOR_QUESTION, color_answer(spec["color"])),
                     (SHAPE_QUESTION, shape_answer(spec["shape"]))]
        for kind, (question, answer) in zip(("color", "shape"), exchanges, strict=True):
            heldout.append(question_record(f"{base}-{kind}", image, question, answer))
        # Alternating order: each question is the follow-up on half of the images.
        heldout_multiturn.append(
            conversation_record(f"{base}-both", image, exchanges[::1 if index % 2 else -1]))
    text = text_records(n_text, seed)

    files = {"pretrain": pretrain, "finetune": finetune, "heldout": heldout,
             "heldout_multiturn": heldout_multiturn, "text": text}
    paths = {name: out / f"{name}.json" for name in files}
    for name, records in files.items():
        write_json_atomic(paths[name], records)
    return {
        "out_dir": str(out),
        "image_dir": str(image_root),
        "image_size": image_size,
        "seed": seed,
        "images": {"train": n_train, "heldout": n_heldout},
        "records": {name: len(records) for name, records in files.items()},
        "files": {name: str(path) for name, path in paths.items()},
        "seconds": round(time.perf_counter() - start, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m llava_tune.demo.shapes OUT_DIR [--train N] [--heldout N] [--seed S] ...``."""
    parser = argparse.ArgumentParser(description="Generate the shapes demo data (SHAPES.md).")
    parser.add_argument("out_dir", help="output folder")
    parser.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    parser.add_argument("--heldout", type=int, default=200, help="held-out images (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--image-size", type=int, default=112, help="image side in pixels (default 112)"
    )
    parser.add_argument("--text", type=int, default=4000, help="text-only records (default 4000)")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes for rendering (default 1)"
    )
    parser.add_argument("--multi-turn", type=float, default=0.0,
                        help="fraction of training images asked both questions in one "
                        "two-turn conversation (default 0)")
    args = parser.parse_args(argv)
    if min(args.train, args.heldout, args.text) < 0 or args.image_size < 8 or args.workers < 1:
        parser.error("counts must be >= 0, --image-size >= 8 and --workers >= 1")
    if not 0 <= args.multi_turn <= 1:
        parser.error("--multi-turn must be in [0, 1]")
    summary = generate(
        args.out_dir,
        n_train=args.train,
        n_heldout=args.heldout,
        seed=args.seed,
        image_size=args.image_size,
        workers=args.workers,
        n_text=args.text,
        multi_turn=args.multi_turn,
    )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
