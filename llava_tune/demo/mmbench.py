"""The shapes task (data/SHAPES.md) as MMBench-style multiple choice.

- `write_shapes_tsv`: an MMBench-format TSV of fresh shapes images (own random stream), two
  questions per image, about half of them with a `hint` (context before the question, never
  the answer, as MMBench's): "What color is the shape?" (4 options: the right color and 3 others of
  the 6) and "What shape is this?" (the 4 shapes), categories "color" / "shape", base64 PNG
  images. Optionally with MMBench's own circular copies (index + k * 1e6, image = the
  original's index), so both kinds of MMBench file can be produced.
- `mcq_records`: LLaVA-format training records asking the same lettered questions about the
  training images, with the prompt `llava_tune.inference.mmbench` builds at evaluation.

The training answer is the letter alone ("B"), not "B. blue": it is what XTuner's instruction
("Answer with the option's letter from the given choices directly.") asks for and what
LLaVA-1.5's mix trains with that instruction; the letter is the first and only decision, so
the loss is not spread over text that a causal model writes after choosing (and that could
contradict the letter); and `extract_letter` reads a lone letter by its first, strictest rule.

The embedded demo trains with `answer="text"` instead (the option's text alone, "blue"),
which `extract_letter` maps to its letter. Picking the letter means finding, in the prompt,
the option that matches the image and copying the letter before it; the demo's 4-layer LM did
not learn that in the demo's budget (measured: trained with letter answers, stage 2 answered
"A" to every question, CircularEval 0; even 1,000 extra steps of text-only lettered questions
for the LM alone left it at 0.31, chance being 0.25). A 1.8B or 7B LLM has the skill from its
own training; the letter records are for those.

Usage:
    python -m llava_tune.demo.mmbench tsv OUT.tsv [--images N] [--seed S] [--circular-copies]
    python -m llava_tune.demo.mmbench mcq SHAPES_DIR [--out FILE] [--seed S] [--answer STYLE]
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from llava_tune.constants import IMAGE_TOKEN
from llava_tune.demo import shapes
from llava_tune.files import write_text_atomic
from llava_tune.inference.mmbench import (
    CIRCULAR_OFFSET,
    build_messages,
    rotate_options,
)

LETTERS = ("A", "B", "C", "D")
TSV_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category",
               "l2-category", "image")
L2_CATEGORY = "coarse_perception"
"""MMBench's l2-category for recognizing attributes of a whole image."""
HINTS = (
    "The picture is a simple drawing on a white background.",
    "There is exactly one object in the image.",
    "Look carefully at the image before you answer.",
    "This image comes from a set of drawings made for a test.",
    "The drawing was made by a computer program.",
    "Nothing else is shown next to it.",
    "Only one answer is correct.",
    "The object may be small or large, anywhere in the picture.",
    "The background of the image is plain.",
    "A student drew this picture for a lesson.",
    "The image is small and has no text in it.",
    "Read the options before answering.",
)
"""Context sentences for MMBench's `hint` field. MMBench's hints are context that comes
before the question; these never give the answer away, so a model must still look."""
HINT_FRACTION = 0.5
"""Lettered questions (training and TSV) that carry a hint, about half, as in MMBench."""


def pick_hint(rng: random.Random) -> str | None:
    """A hint for `HINT_FRACTION` of the questions, else None."""
    return rng.choice(HINTS) if rng.random() < HINT_FRACTION else None


def color_options(rng: random.Random, color: str) -> dict[str, str]:
    """Four lettered colors: `color` and three others of the six, in random order."""
    others = rng.sample([c for c in shapes.COLORS if c != color], 3)
    chosen = [color, *others]
    rng.shuffle(chosen)
    return dict(zip(LETTERS, chosen, strict=True))


def shape_options(rng: random.Random) -> dict[str, str]:
    """The four shapes, lettered in random order."""
    chosen = list(shapes.SHAPES)
    rng.shuffle(chosen)
    return dict(zip(LETTERS, chosen, strict=True))


def letter_of(options: dict[str, str], text: str) -> str:
    return next(letter for letter, option in options.items() if option == text)


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def shapes_tsv_rows(n_images: int, seed: int = 0, image_size: int = 112,
                    circular_copies: bool = False) -> list[dict[str, str]]:
    """The TSV's rows (column -> text): a color and a shape question per image.

    Image i gives rows 2i (color) and 2i+1 (shape); both carry the image (MMBench repeats an
    image per question). With `circular_copies`, after all originals come the rotated copies
    `index + k * 1e6` (k = 1..3), whose image field is the original's index, as MMBench does.
    """
    rng = random.Random(f"shapes-mmbench-{seed}")
    hint_rng = random.Random(f"shapes-mmbench-hints-{seed}")  # images as without hints
    rows: list[dict[str, str]] = []
    for i in range(n_images):
        spec = shapes.sample_shape(rng, image_size)
        image = shapes.draw_shape(spec["shape"], spec["color"], spec["size"], spec["center"],
                                  image_size)
        encoded = _png_base64(image)
        questions = [
            ("color", shapes.COLOR_QUESTION, color_options(rng, spec["color"]), spec["color"]),
            ("shape", shapes.SHAPE_QUESTION, shape_options(rng), spec["shape"]),
        ]
        for k, (category, question, options, right) in enumerate(questions):
            rows.append({"index": str(2 * i + k), "question": question,
                         "hint": pick_hint(hint_rng) or "", **options,
                         "answer": letter_of(options, right), "category": category,
                         "l2-category": L2_CATEGORY, "image": encoded})
    if circular_copies:
        copies = []
        for shift in range(1, len(LETTERS)):
            for row in rows:
                options, answer = rotate_options({x: row[x] for x in LETTERS}, row["answer"],
                                                 shift)
                copies.append({**row, **options, "answer": answer,
                               "index": str(int(row["index"]) + shift * CIRCULAR_OFFSET),
                               "image": row["index"]})
        rows += copies
    return rows


def write_shapes_tsv(path: str | Path, n_images: int = 100, seed: int = 0,
                     image_size: int = 112, circular_copies: bool = False) -> Path:
    """Write `shapes_tsv_rows` as an MMBench TSV (tab-separated, header first) atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(TSV_COLUMNS)
    for row in shapes_tsv_rows(n_images, seed, image_size, circular_copies):
        writer.writerow([row[c] for c in TSV_COLUMNS])
    write_text_atomic(path, buffer.getvalue())
    return Path(path)


ANSWER_STYLES = ("letter", "letter_text", "text")


def mcq_records(items: Iterable[tuple[str, str, str]], seed: int = 0,
                with_text: bool = False, answer: str = "letter",
                multi_turn: bool = False) -> list[dict[str, Any]]:
    """Lettered color and shape questions about images, as LLaVA-format records.

    Args:
        items: (image path as the records should hold it, color, shape) per image.
        seed: the options' random order.
        with_text: answer "B. blue" instead of "B" (see the module docstring for the default);
            the same as `answer="letter_text"`.
        answer: "letter" ("B"), "letter_text" ("B. blue") or "text" (the option's text alone,
            "blue", which `extract_letter` maps to its letter).
        multi_turn: an image's two questions as one two-turn record (id `mcq-N-both`, the
            order random, the image marker on the first only) instead of two records.

    The human turn is exactly the evaluation prompt (`build_messages`: `<image>\\n`, a hint
    on about half of them (`HINTS`), the question, the options, the instruction), so training
    and evaluation see the same text.
    """
    if answer not in ANSWER_STYLES:
        raise ValueError(f"answer must be one of {ANSWER_STYLES}, got {answer!r}")
    style = "letter_text" if with_text else answer
    rng = random.Random(f"shapes-mcq-{seed}")
    hint_rng = random.Random(f"shapes-mcq-hints-{seed}")  # options as without hints
    turn_rng = random.Random(f"shapes-mcq-turns-{seed}")  # options as with one turn each
    records = []
    for n, (image, color, shape) in enumerate(items):
        turns = []
        for kind, question, options, right in (
            ("color", shapes.COLOR_QUESTION, color_options(rng, color), color),
            ("shape", shapes.SHAPE_QUESTION, shape_options(rng), shape),
        ):
            letter = letter_of(options, right)
            reply = {"letter": letter, "letter_text": f"{letter}. {right}", "text": right}[style]
            human = build_messages(question, options, pick_hint(hint_rng))[0]["content"]
            turns.append((kind, [{"from": "human", "value": human}, {"from": "gpt", "value": reply}]))
        if not multi_turn:
            records += [{"id": f"mcq-{n:06d}-{kind}", "image": image, "conversations": turn}
                        for kind, turn in turns]
            continue
        if turn_rng.random() < 0.5:
            turns.reverse()
        first, second = turns[0][1], turns[1][1]
        follow_up = {"from": "human", "value": second[0]["value"].removeprefix(f"{IMAGE_TOKEN}\n")}
        records.append({"id": f"mcq-{n:06d}-both", "image": image,
                        "conversations": [*first, follow_up, second[1]]})
    return records


_CAPTION = re.compile(r"A (\w+) (\w+)\.")


def items_from_captions(records: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(image, color, shape) of each record of the demo's pretrain.json ("A red circle.")."""
    items = []
    for record in records:
        match = _CAPTION.fullmatch(record["conversations"][-1]["value"])
        if match is None or match.group(1) not in shapes.COLORS or match.group(2) not in shapes.SHAPES:
            raise ValueError(f"record {record.get('id')!r} is not a shapes caption record")
        items.append((record["image"], match.group(1), match.group(2)))
    return items


def add_mcq_to_finetune(shapes_dir: str | Path, fraction: float, seed: int = 0,
                        answer: str = "letter", multi_turn: bool = False) -> int:
    """Append `mcq_records` for the first `fraction` of the training images to finetune.json.

    The images come from pretrain.json's captions (one per training image). LLaVA-1.5's mix
    holds such lettered questions next to its free-form ones; here they teach the MMBench
    prompt and an answer `extract_letter` reads (`answer`: see `mcq_records`). The SHAPES.md
    questions stay as they were, first in the file. Returns how many records were added.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    shapes_dir = Path(shapes_dir)
    items = items_from_captions(json.loads((shapes_dir / "pretrain.json").read_text()))
    records = mcq_records(items[:round(fraction * len(items))], seed, answer=answer,
                          multi_turn=multi_turn)
    finetune = json.loads((shapes_dir / "finetune.json").read_text())
    shapes.write_json_atomic(shapes_dir / "finetune.json", finetune + records)
    return len(records)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    tsv = commands.add_parser("tsv", help="write an MMBench-format TSV of new shapes images")
    tsv.add_argument("out", type=Path)
    tsv.add_argument("--images", type=int, default=100, help="images (2 questions each)")
    tsv.add_argument("--seed", type=int, default=0)
    tsv.add_argument("--image-size", type=int, default=112)
    tsv.add_argument("--circular-copies", action="store_true",
                     help="add MMBench's rotated copies (index + k * 1e6)")
    mcq = commands.add_parser("mcq", help="lettered questions for the training images of a "
                                          "shapes folder (from its pretrain.json)")
    mcq.add_argument("shapes_dir", type=Path)
    mcq.add_argument("--out", type=Path, help="default: SHAPES_DIR/finetune_mcq.json")
    mcq.add_argument("--seed", type=int, default=0)
    mcq.add_argument("--answer", choices=ANSWER_STYLES, default="letter",
                     help="letter (B), letter_text (B. blue) or text (blue); default letter")
    args = parser.parse_args(argv)
    if args.command == "tsv":
        write_shapes_tsv(args.out, args.images, args.seed, args.image_size, args.circular_copies)
        print(f"wrote {args.out}")
    else:
        captions = json.loads((args.shapes_dir / "pretrain.json").read_text())
        records = mcq_records(items_from_captions(captions), args.seed, answer=args.answer)
        out = args.out or args.shapes_dir / "finetune_mcq.json"
        shapes.write_json_atomic(out, records)
        print(f"wrote {len(records)} records to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
