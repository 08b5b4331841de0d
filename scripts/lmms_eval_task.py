"""Write an lmms-eval task of LLaVA-format questions (the demo's held-out shapes by default),
for lmms-eval's OpenAI-compatible model pointed at `llava-tune serve`.

    python scripts/lmms_eval_task.py OUT_DIR [--data demo_out/shapes/heldout.json]
        [--image-folder demo_out/shapes/images] [--name llava_tune_shapes] [--limit N]

OUT_DIR gets the task (NAME.yaml, utils.py, NAME.jsonl: one row per question, the image's
absolute path, the question, the reference answer); lmms-eval reads it with --include_path
OUT_DIR --tasks NAME, from these files alone (no dataset download). Scored by exact match
after SHAPES.md's normalization (lower case, white space and one final period stripped), as
`llava-tune eval` scores. The task's files import only PIL: they run in lmms-eval's own
environment, which needs no llava-tune.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IMAGE = "<image>"

UTILS = '''"""Written by llava-tune's scripts/lmms_eval_task.py."""
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def normalize(text):
    text = text.strip().lower()
    return (text[:-1] if text.endswith(".") else text).strip()


def process_results(doc, results):
    return {"exact_match": float(normalize(results[0]) == normalize(doc["answer"]))}
'''

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rows}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  until: ["\\n\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def rows_of(data: Path, image_folder: Path, limit: int | None) -> list[dict]:
    """One row per single-turn record with images: its images, question and answer."""
    rows = []
    for record in json.loads(data.read_text()):
        turns = record["conversations"]
        if len(turns) != 2 or "image" not in record:
            continue
        images = record["image"] if isinstance(record["image"], list) else [record["image"]]
        question = turns[0]["value"].replace(f"{IMAGE}\n", "").replace(IMAGE, "").strip()
        rows.append({"id": record["id"], "images": [str((image_folder / i).resolve())
                                                    for i in images],
                     "question": question, "answer": turns[1]["value"]})
        if limit is not None and len(rows) == limit:
            break
    return rows


def write_task(out: Path, data: Path, image_folder: Path, name: str = "llava_tune_shapes",
               limit: int | None = None, max_new_tokens: int = 16) -> Path:
    """The task folder (for --include_path); returns it."""
    rows = rows_of(data, image_folder, limit)
    if not rows:
        raise SystemExit(f"{data} has no single-question records with images")
    out.mkdir(parents=True, exist_ok=True)
    table = out / f"{name}.jsonl"
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (out / "utils.py").write_text(UTILS)
    (out / f"{name}.yaml").write_text(TASK.format(name=name, rows=json.dumps(str(table.resolve())),
                                                  max_new_tokens=max_new_tokens))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--data", default="demo_out/shapes/heldout.json")
    parser.add_argument("--image-folder", default="demo_out/shapes/images")
    parser.add_argument("--name", default="llava_tune_shapes")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    out = write_task(Path(args.out), Path(args.data), Path(args.image_folder), args.name,
                     args.limit, args.max_new_tokens)
    print(f"wrote the lmms-eval task {args.name} in {out} (--include_path {out} --tasks "
          f"{args.name})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
