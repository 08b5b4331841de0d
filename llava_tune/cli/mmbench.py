"""`llava-tune eval RUN --mmbench FILE.tsv [--circular] [--out DIR]`: MMBench-format multiple
choice on a run, through the library in llava_tune/inference/mmbench/ with batched greedy
generation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava_tune.errors import UserError


def add_arguments(p: argparse.ArgumentParser, source) -> None:
    """`--mmbench` (into the `--data`/`--mmbench` exclusive group `source`) and `--circular`."""
    source.add_argument("--mmbench", metavar="FILE.tsv",
                        help="MMBench-format TSV (index, question, hint, A-D, answer, category, "
                        "l2-category, base64 image): multiple-choice accuracy, overall and per "
                        "category")
    p.add_argument("--circular", action="store_true",
                   help="with --mmbench: CircularEval, a question counts only if answered right "
                   "with its options in every rotation (the plain score is reported too)")


def answer_batch_fn(bundle, settings):
    """The library's batch callable, [(messages, [image]), ...] -> [answer, ...], on
    `generate_batch` (the same conversations type: one user turn and its image)."""
    from llava_tune.inference.generate import generate_batch

    def answer_batch(batch: list) -> list[str]:
        return generate_batch(bundle, [(messages, list(images)) for messages, images in batch],
                              settings)

    return answer_batch


def _print_scores(title: str, overall, category: dict) -> None:
    print(f"{title} {overall.accuracy:.4f} ({overall.correct}/{overall.total})")
    width = max((len(name) for name in category), default=0)
    for name, score in category.items():
        print(f"  {name:{width}s}  {score.accuracy:.4f} ({score.correct}/{score.total})")


def cmd_eval_mmbench(args: argparse.Namespace) -> int:
    from llava_tune import progress
    from llava_tune.assembly.model import load_model
    from llava_tune.inference.generate import GenerationSettings, eval_batch_size
    from llava_tune.inference.mmbench import evaluate_mmbench_batched, output_paths

    if args.image_folder:
        raise UserError("--image-folder is for --data; an MMBench TSV holds its images")
    if args.json:
        raise UserError("--json is for --data; with --mmbench, --out DIR gets the summary JSON "
                        "(and the predictions TSV)")
    batch_size = eval_batch_size(args.batch_size)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)

    # The model loads at the first question: the library reads and checks the TSV and the
    # output folder first, so a bad file costs no model load.
    state: dict = {}

    def answer_batch(batch: list) -> list[str]:
        if "answer" not in state:
            state["loading"] = True
            state["answer"] = answer_batch_fn(load_model(args.run_dir, base=args.base), settings)
            state["bar"] = progress.Bar(0, desc="evaluating", unit="question")
        return state["answer"](batch)

    def on_progress(done: int, total: int) -> None:
        if "bar" in state:
            state["bar"].reached(done, total)

    try:
        result = evaluate_mmbench_batched(args.mmbench, answer_batch, circular=args.circular,
                                          out_dir=args.out, on_progress=on_progress,
                                          batch_size=batch_size)
    except BaseException:
        if state.get("loading") and "answer" not in state and args.out is not None:
            # The model failed to load, so the partial file holds only its header.
            output_paths(args.mmbench, args.out)["partial"].unlink(missing_ok=True)
        raise
    finally:
        if "bar" in state:
            state["bar"].close()

    for skipped in result.skipped:
        print(f"skipped index {skipped.index} (line {skipped.line}): {skipped.reason}",
              file=sys.stderr)
    name = Path(args.mmbench).name
    if result.overall is None:
        print(f"MMBench {name}: {result.n_questions} questions answered, none scored (the file "
              "has no answer column)")
    elif args.circular:
        _print_scores(f"MMBench {name} circular", result.overall, result.category)
        _print_scores(f"MMBench {name} plain", result.plain, result.plain_category)
    else:
        _print_scores(f"MMBench {name} accuracy", result.overall, result.category)
    if result.n_no_letter:
        print(f"{result.n_no_letter} of {result.n_passes} answers named no option",
              file=sys.stderr)
    if result.predictions_file is not None:
        print(f"wrote {result.predictions_file} and {result.summary_file}", file=sys.stderr)
    return 0
