"""A LLaVA-665K-like finetune mix, generated: the shape of the data, not its meaning.

    python -m llava_tune.demo.mix OUT_DIR [--records 2000] [--seed 0] [--image-size 336]

What makes LLaVA's llava_v1_5_mix665k.json slow or fast to train on is its lengths: how many
question/answer turns a record has and how long they are, and how many records carry no
image. This writes records with that structure, in words the demo tokenizer knows (those of
llava_tune/demo/shapes.py's text), so any tokenizer trained on the demo text encodes them compactly:

- VQA-style image records (VQAv2, GQA, OCR-VQA merged per image): 1-8 turns of a short
  question and a one-to-three word answer;
- instruction image records (LLaVA-Instruct conversations, detailed descriptions, complex
  reasoning): 1-4 turns with answers of 20-150 words;
- short-description image records (TextCaps, RefCOCO, VG regions): 1-3 turns, 4-12 word answers;
- text-only multi-turn records (ShareGPT-like), about a third of all records (TEXT_ONLY_FRACTION):
  1-8 turns with answers of 10-200 words.

OUT_DIR/mix.json        LLaVA records; "image" paths are relative to OUT_DIR/images
OUT_DIR/images/*.jpg    one image per image record: a few shapes on a colored background, of
                        varied aspect ratio (long side --image-size), so pad-to-square has work

Everything is drawn from random streams seeded by --seed: the same arguments give the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from llava_tune.constants import IMAGE_TOKEN
from llava_tune.demo import shapes

TEXT_ONLY_FRACTION = 1 / 3
"""Share of records without an image (the issue's mix: about a third text-only)."""

IMAGE_KINDS: dict[str, float] = {"vqa": 0.5, "instruct": 0.3, "describe": 0.2}
"""Image record kinds and their shares among image records."""

MAX_TURNS = 8
"""Most question/answer turns in one record."""

SHORT_ANSWER_PROMPT = "Please answer the question in one short sentence."
"""Appended to VQA questions, as LLaVA appends "Answer the question using a single word or phrase."."""

ASPECT_RATIOS: tuple[tuple[int, int], ...] = ((4, 3), (3, 4), (1, 1), (16, 9), (3, 2))
"""Width:height of the generated images (COCO-like, mostly landscape)."""


def vocabulary() -> list[str]:
    """The words of the demo's own text (llava_tune/demo/shapes.py), lower-cased, sorted, no punctuation."""
    texts = [*shapes.GENERIC_SENTENCES, *shapes.GENERIC_PROMPTS, *shapes.CAPTION_INSTRUCTIONS,
             shapes.COLOR_QUESTION, shapes.SHAPE_QUESTION, *shapes.COLOR_PARAPHRASES,
             *shapes.SHAPE_PARAPHRASES, *shapes.COLORS, *shapes.SHAPES]
    words = {word.lower() for text in texts for word in re.findall(r"[A-Za-z]+", text)}
    return sorted(word for word in words if len(word) > 1 or word == "a")  # no "s" of "let's"


def _sentence(rng: random.Random, words: list[str], n: int, end: str = ".") -> str:
    picked = [rng.choice(words) for _ in range(max(1, n))]
    return " ".join(picked).capitalize() + end


def _paragraph(rng: random.Random, words: list[str], n_words: int) -> str:
    """About `n_words` words as sentences of 6-16 words."""
    sentences, left = [], n_words
    while left > 0:
        n = min(left, rng.randint(6, 16))
        sentences.append(_sentence(rng, words, n))
        left -= n
    return " ".join(sentences)


def _turn_count(rng: random.Random, low: int, high: int) -> int:
    """low..high, short conversations more likely (weights 1/k)."""
    counts = list(range(low, high + 1))
    return rng.choices(counts, weights=[1 / (1 + c - low) for c in counts])[0]


def _turns(rng: random.Random, words: list[str], kind: str) -> list[tuple[str, str]]:
    """(question, answer) pairs for one record of `kind`."""
    if kind == "vqa":
        n = rng.randint(1, MAX_TURNS)  # VQA questions of one image are merged into one record
        return [(f"{_sentence(rng, words, rng.randint(4, 10), '?')}\n{SHORT_ANSWER_PROMPT}",
                 _sentence(rng, words, rng.randint(1, 3), "")) for _ in range(n)]
    if kind == "instruct":
        n = _turn_count(rng, 1, 4)
        return [(_sentence(rng, words, rng.randint(6, 16), "?"),
                 _paragraph(rng, words, rng.randint(20, 150))) for _ in range(n)]
    if kind == "describe":
        n = _turn_count(rng, 1, 3)
        return [(_sentence(rng, words, rng.randint(3, 8)),
                 _sentence(rng, words, rng.randint(4, 12))) for _ in range(n)]
    if kind == "text":
        n = _turn_count(rng, 1, MAX_TURNS)
        return [(_paragraph(rng, words, rng.randint(5, 40)),
                 _paragraph(rng, words, rng.randint(10, 200))) for _ in range(n)]
    raise ValueError(f"unknown record kind {kind!r}")


def mix_records(n: int, seed: int = 0,
                text_only_fraction: float = TEXT_ONLY_FRACTION) -> list[dict[str, Any]]:
    """`n` LLaVA records (no files written). Image records name `images/{k:06d}.jpg` as
    "{k:06d}.jpg" and carry `<image>` once, at the start or end of their first question."""
    rng = random.Random(f"mix-records-{seed}")
    words = vocabulary()
    n_text = round(n * text_only_fraction)
    kinds = ["text"] * n_text + rng.choices(list(IMAGE_KINDS), weights=list(IMAGE_KINDS.values()),
                                           k=n - n_text)
    rng.shuffle(kinds)
    records, n_images = [], 0
    for index, kind in enumerate(kinds):
        conversations = []
        for question, answer in _turns(rng, words, kind):
            conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        record: dict[str, Any] = {"id": f"mix-{index:06d}-{kind}"}
        if kind != "text":
            first = conversations[0]["value"]
            image_first = rng.random() < 0.8  # LLaVA's data puts <image> first in most records
            tag = IMAGE_TOKEN
            conversations[0]["value"] = f"{tag}\n{first}" if image_first else f"{first}\n{tag}"
            record["image"] = f"{n_images:06d}.jpg"
            n_images += 1
        record["conversations"] = conversations
        records.append(record)
    return records


def mix_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Turn counts, the text-only share and answer lengths (in words) of `records`."""
    turns = [len(r["conversations"]) // 2 for r in records]
    answers = [len(t["value"].split()) for r in records for t in r["conversations"]
               if t["from"] == "gpt"]
    return {
        "records": len(records),
        "images": sum("image" in r for r in records),
        "text_only_fraction": round(sum("image" not in r for r in records) / max(1, len(records)), 4),
        "turns": dict(sorted(Counter(turns).items())),
        "mean_turns": round(statistics.fmean(turns), 3) if turns else 0.0,
        "answer_words": {"mean": round(statistics.fmean(answers), 2) if answers else 0.0,
                         "max": max(answers, default=0), "min": min(answers, default=0)},
    }


def draw_image(rng: random.Random, long_side: int) -> Image.Image:
    """A few filled shapes of the demo's colors on a random background, random aspect ratio."""
    w, h = rng.choice(ASPECT_RATIOS)
    if w >= h:
        width, height = long_side, max(1, long_side * h // w)
    else:
        width, height = max(1, long_side * w // h), long_side
    background = tuple(rng.randint(0, 255) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        color = shapes.COLORS[rng.choice(tuple(shapes.COLORS))]
        size = rng.uniform(0.15, 0.5) * min(width, height)
        x, y = rng.uniform(0, width - size), rng.uniform(0, height - size)
        box = (x, y, x + size, y + size)
        if rng.random() < 0.5:
            draw.ellipse(box, fill=color)
        else:
            draw.rectangle(box, fill=color)
    return image


def generate_mix(out_dir: str | Path, n_records: int = 2000, seed: int = 0,
                 image_size: int = 336) -> dict[str, Any]:
    """Write OUT_DIR/mix.json and its images (layout in the module docstring); returns
    `mix_stats` plus the paths written."""
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records = mix_records(n_records, seed)
    rng = random.Random(f"mix-images-{seed}")
    for record in records:
        if "image" in record:
            draw_image(rng, image_size).save(image_dir / record["image"], format="JPEG", quality=90)
    shapes.write_json_atomic(out / "mix.json", records)
    return {**mix_stats(records), "file": str(out / "mix.json"), "image_folder": str(image_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=336, help="long side of the images in pixels")
    args = parser.parse_args(argv)
    if args.records < 1 or args.image_size < 8:
        parser.error("--records must be >= 1 and --image-size >= 8")
    print(json.dumps(generate_mix(args.out_dir, args.records, args.seed, args.image_size), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
