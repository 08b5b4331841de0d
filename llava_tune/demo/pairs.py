"""Preference pairs about the demo's shapes, for its third stage (dpo, scripts/dpo.sh).

Each pair asks one question about one image (its color or its shape) and holds the right
answer (chosen) and a wrong one (rejected) of one of three kinds, in turn:

- a wrong color ("It is blue." for a red shape),
- a wrong shape ("It is a star." for a circle),
- a hallucination: the right answer with an object the image does not hold ("It is red,
  beside a small green square.").

Written in TRL's preference format ({"prompt", "chosen", "rejected", "images"}) from the
shapes data's own files (finetune.json and heldout.json: their questions and answers), so
the pairs are about exactly the images stages 1 and 2 saw and the held-out ones.

    python -m llava_tune.demo.pairs SHAPES_DIR [--train N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from llava_tune.constants import IMAGE_TOKEN
from llava_tune.demo.shapes import COLORS, SHAPES, color_answer, shape_answer, write_json_atomic

REJECTIONS = ("color", "shape", "extra object")
"""The kinds of wrong answer, used in turn."""


def _qa_pairs(records: list[dict]) -> list[tuple[str, str, str]]:
    """(image, question, answer) of every turn of LLaVA-format records."""
    found = []
    for record in records:
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            question = human["value"].replace(IMAGE_TOKEN, "").strip()
            found.append((record["image"], question, gpt["value"]))
    return found


def _facts(answer: str) -> tuple[str | None, str | None]:
    """(color, shape) an answer names: "It is red." -> (red, None)."""
    color = next((c for c in COLORS if re.search(rf"\b{c}\b", answer)), None)
    shape = next((s for s in SHAPES if re.search(rf"\b{s}\b", answer)), None)
    return color, shape


def rejected_answer(answer: str, kind: str, rng: random.Random) -> str:
    """A wrong answer of `kind` (REJECTIONS) in place of the right `answer`."""
    color, shape = _facts(answer)
    if kind == "extra object":
        other_color = rng.choice([c for c in COLORS if c != color])
        other_shape = rng.choice([s for s in SHAPES if s != shape])
        return f"{answer.rstrip('.')}, beside a small {other_color} {other_shape}."
    if color is not None and (kind == "color" or shape is None):
        return color_answer(rng.choice([c for c in COLORS if c != color]))
    return shape_answer(rng.choice([s for s in SHAPES if s != shape]))


def pairs_of(records: list[dict], prefix: str, seed: int, limit: int | None = None) -> list[dict]:
    """TRL-format pairs of the questions in `records`, the rejection kinds in turn."""
    rng = random.Random(f"pairs-{prefix}-{seed}")
    turns = _qa_pairs(records)
    if limit is not None:
        turns = rng.sample(turns, min(limit, len(turns)))
    pairs = []
    for index, (image, question, answer) in enumerate(turns):
        kind = REJECTIONS[index % len(REJECTIONS)]
        pairs.append({"id": f"{prefix}-{index:06d}", "prompt": f"{IMAGE_TOKEN}\n{question}",
                      "chosen": answer, "rejected": rejected_answer(answer, kind, rng),
                      "images": [image], "rejection": kind})
    return pairs


def generate(shapes_dir: str | Path, train: int = 1500, seed: int = 0) -> dict[str, Path]:
    """preference_train.json (`train` pairs about training images) and
    preference_heldout.json (two per held-out image: its color and its shape question) in
    `shapes_dir`, beside the shapes data they are made from."""
    folder = Path(shapes_dir)
    finetune = json.loads((folder / "finetune.json").read_text(encoding="utf-8"))
    heldout = json.loads((folder / "heldout.json").read_text(encoding="utf-8"))
    files = {"train": folder / "preference_train.json",
             "heldout": folder / "preference_heldout.json"}
    write_json_atomic(files["train"], pairs_of(finetune, "train", seed, train))
    write_json_atomic(files["heldout"], pairs_of(heldout, "heldout", seed))
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Preference pairs about the demo's shapes.")
    parser.add_argument("shapes_dir", help="the shapes data folder (DEMO_OUT/shapes)")
    parser.add_argument("--train", type=int, default=1500, help="training pairs (default 1500)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in generate(args.shapes_dir, args.train, args.seed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
