"""`llava-tune`: the command line. The only module that parses arguments or prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

from llava_tune.errors import UserError


def _progress_printer():
    from tqdm import tqdm

    bar = None

    def on_event(event: dict) -> None:
        nonlocal bar
        kind = event["event"]
        if kind == "start":
            print(f"[{event['stage']}] run dir {event['run_dir']} on {event['device']}, "
                  f"LLM {event['llm']}", file=sys.stderr)
            for name, (trainable, total) in event["parameters"].items():
                print(f"  {name:9s} {trainable:>13,} trainable of {total:>13,}", file=sys.stderr)
            print("  data: " + event["data"].summary().replace("\n", "\n  "), file=sys.stderr)
            bar = tqdm(total=event["total_steps"], initial=event["step"], unit="step",
                       file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
        elif kind == "log":
            bar.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{event['lr']:.2e}",
                            tok_s=f"{event['tokens_per_s']:.0f}", refresh=False)
            bar.update(event["step"] - bar.n)
        elif kind == "end":
            if bar is not None:
                bar.close()
            for record_id, error in event["skipped"][:5]:
                print(f"  skipped {record_id}: {error}", file=sys.stderr)
            if event["skipped"]:
                print(f"  {len(event['skipped'])} samples skipped at load time", file=sys.stderr)
            print(f"[done] {event['steps']} steps, last loss {event['loss']:.4f}, "
                  f"weights in {event['run_dir']}", file=sys.stderr)

    return on_event


def cmd_train(args: argparse.Namespace) -> int:
    from llava_tune.config import load_config
    from llava_tune.engine.trainer import train

    config = load_config(args.config, args.overrides)
    train(config, on_event=_progress_printer())
    return 0


def _eval_items(records: list[dict]):
    """(record, messages so far, reference answer) for every user turn with an answer."""
    for record in records:
        messages = record["messages"]
        for i, message in enumerate(messages):
            if message["role"] == "assistant" and i > 0:
                yield record, messages[:i], message["content"]


def cmd_eval(args: argparse.Namespace) -> int:
    from llava_tune.data.formats import read_conversations
    from llava_tune.data.image import load_image
    from llava_tune.engine.build import load_run
    from llava_tune.engine.checkpoint import write_text_atomic
    from llava_tune.inference.generate import (
        GenerationSettings,
        generate,
        normalize_answer,
        strip_image_markers,
    )

    result = read_conversations(args.data)
    for problem in result.problems:
        print(f"skipped {problem}", file=sys.stderr)
    built = load_run(args.run_dir, base=args.base)
    folder = Path(args.image_folder) if args.image_folder else None
    if any(r["images"] for r in result.records) and built.model.vision is None:
        raise UserError(f"{args.data} has images but {args.run_dir} is a text-only model")
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    correct, total = 0, 0
    by_question: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    lines = []
    for record, messages, answer in _eval_items(result.records):
        if record["images"] and folder is None:
            raise UserError(f"{args.data} has images; pass --image-folder")
        images = [load_image(folder / name) for name in record["images"]]
        prediction = generate(built, messages, images, settings)
        hit = normalize_answer(prediction) == normalize_answer(answer)
        question = strip_image_markers(messages[-1]["content"])
        correct += hit
        total += 1
        by_question[question][0] += hit
        by_question[question][1] += 1
        lines.append(json.dumps({"id": record["id"], "question": question,
                                 "prediction": prediction, "answer": answer, "correct": hit}))
    if total == 0:
        raise UserError(f"{args.data} has no user turn with an answer to evaluate")
    if args.out:
        write_text_atomic(Path(args.out), "\n".join(lines) + "\n")
    summary = {"accuracy": correct / total, "correct": correct, "total": total}
    if len(by_question) <= 10:
        summary["by_question"] = {q: {"accuracy": c / n, "total": n} for q, (c, n) in by_question.items()}
    print(f"accuracy {correct / total:.4f} ({correct}/{total})")
    for question, stats in summary.get("by_question", {}).items():
        print(f"  {stats['accuracy']:.4f}  {question} (n={stats['total']})")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(summary, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llava_tune.engine.export import export

    path = export(args.run_dir, args.out_dir, args.format, base=args.base)
    print(f"exported {args.format} to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-tune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one stage from a YAML config")
    p.add_argument("config", help="YAML config (configs/...)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.lr=1e-4 run_dir=runs/x")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="greedy answers and exact-match accuracy on a data file")
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="LLaVA-format JSON/JSONL with reference answers")
    p.add_argument("--image-folder", help="folder the records' image paths are relative to")
    p.add_argument("--out", help="write predictions as JSONL (id, question, prediction, answer)")
    p.add_argument("--json", help="write the accuracy summary as JSON")
    p.add_argument("--base", help="base LLM folder, when it moved since training")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a run's model in another layout")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--format", required=True, choices=["llm", "internlm2"])
    p.add_argument("--base", help="base LLM folder, when it moved since training")
    p.set_defaults(func=cmd_export)
    return parser


def quiet_libraries() -> None:
    """Keep the terminal for our own progress: no per-file loading bars and no deprecation
    notices from inside the libraries."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
