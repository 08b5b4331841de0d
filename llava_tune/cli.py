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
    from llava_tune.files import write_text_atomic
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


def cmd_import_xtuner(args: argparse.Namespace) -> int:
    from llava_tune.engine.xtuner import import_xtuner

    path = import_xtuner(args.xtuner_dir, args.run_dir, llm=args.llm, vision_name=args.vision,
                         vision_pretrained=args.vision_weights,
                         vision_config_file=args.vision_config, feature_layer=args.feature_layer)
    print(f"imported {args.xtuner_dir} as run dir {path}")
    return 0


CHAT_HELP = """commands:
  /image PATH   attach or switch the image (starts a new conversation)
  /reset        start a new conversation (keeps the image)
  /system TEXT  set the system prompt (empty TEXT clears it)
  /help         this list
  /exit         leave (or Ctrl-D); Ctrl-C stops an answer"""


class _Printer:
    """A transformers streamer that writes decoded text as it comes and counts tokens.

    What it writes is the answer `generate` returns, stripped like it: leading white space
    is dropped and trailing white space held back until more text follows it."""

    def __init__(self, tokenizer, out) -> None:
        from transformers import TextStreamer

        printer = self

        class Streamer(TextStreamer):
            def put(self, value):
                if not self.next_tokens_are_prompt:
                    printer.tokens += value.numel()
                super().put(value)

            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                text = printer.held + text
                if not printer.started:
                    text = text.lstrip()
                    printer.started = bool(text)
                body = text.rstrip()
                printer.held = text[len(body):]
                out.write(body)
                out.flush()

        self.tokens = 0
        self.started = False
        self.held = ""
        self.streamer = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _chat_turn(session, question: str, stream: bool, verbose: bool) -> None:
    """Ask, print the answer (token by token when streaming), report speed if verbose."""
    import io
    import time

    printer = _Printer(session.built.tokenizer, sys.stdout if stream else io.StringIO())
    start = time.perf_counter()
    answer = session.ask(question, streamer=printer.streamer)
    print() if stream else print(answer)
    if verbose:
        elapsed = time.perf_counter() - start
        print(f"[{printer.tokens} tokens in {elapsed:.2f}s, "
              f"{printer.tokens / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)


def _chat_command(session, line: str) -> bool:
    """Run one /command; False means leave."""
    command, _, argument = line.partition(" ")
    argument = argument.strip()
    if command in ("/exit", "/quit"):
        return False
    if command == "/image":
        if not argument:
            raise UserError("/image needs a path: /image PATH")
        session.attach_image(argument)
        print(f"(image {argument} attached; new conversation)", file=sys.stderr)
    elif command == "/reset":
        session.reset()
        print("(new conversation)", file=sys.stderr)
    elif command == "/system":
        session.set_system(argument)
        print(f"(system prompt {'set' if argument else 'cleared'})", file=sys.stderr)
    elif command == "/help":
        print(CHAT_HELP, file=sys.stderr)
    else:
        raise UserError(f"unknown command {command}; /help lists the commands")
    return True


def _chat_line(session, line: str, stream: bool, verbose: bool) -> bool:
    """One input line, a /command or a question; False means leave."""
    if line.startswith("/"):
        return _chat_command(session, line)
    _chat_turn(session, line, stream, verbose)
    return True


def _repl(session, args: argparse.Namespace) -> int:
    import readline  # noqa: F401  (line editing and history for input())

    history = Path.home() / ".llava_tune_history"
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    kind = "image chat" if session.has_vision else "text chat"
    print(f"llava-tune {kind} with {args.model}. /help for commands, /exit or Ctrl-D to leave.",
          file=sys.stderr)
    if session.has_vision and session.image is None:
        print("(no image attached: /image PATH attaches one)", file=sys.stderr)
    try:
        while True:
            try:
                line = input(">>> ").strip()
            except EOFError:
                print(file=sys.stderr)
                break
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            if not line:
                continue
            try:
                if not _chat_line(session, line, not args.no_stream, args.verbose):
                    break
            except UserError as err:
                print(f"error: {err}", file=sys.stderr)
            except KeyboardInterrupt:
                print("\n(answer stopped)", file=sys.stderr)
    finally:
        try:
            readline.write_history_file(history)
        except OSError:
            pass
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import torch

    from llava_tune.data.image import load_image
    from llava_tune.engine.build import load_model
    from llava_tune.inference.chat import ChatSession
    from llava_tune.inference.generate import GenerationSettings

    interactive = args.question is None and sys.stdin.isatty()
    if args.image and not interactive:
        load_image(args.image)  # a typo should not wait for a 7B model to load
    if args.seed is not None:
        torch.manual_seed(args.seed)
    bits = {None: True, 4: "4bit", 8: "8bit"}[args.bits]
    built = load_model(args.model, base=args.base, quantization=bits)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    session = ChatSession(built, system=args.system or built.template.default_system,
                          settings=settings)
    if args.image:
        try:
            session.attach_image(args.image)
        except UserError as err:
            if not interactive:
                raise
            print(f"error: {err}", file=sys.stderr)
    if session.has_vision and session.image is None and not interactive:
        print("note: no image attached (--image PATH); answering from the text alone",
              file=sys.stderr)
    if interactive:
        return _repl(session, args)
    stream = not args.no_stream
    if args.question is not None:
        _chat_turn(session, args.question, stream, args.verbose)
        return 0
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if not _chat_line(session, line, stream, args.verbose):
            break
        if not line.startswith("/"):
            print()  # a blank line ends each piped answer
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

    p = sub.add_parser("chat", help="chat with a run (or an LLM folder), with an image",
                       description="Interactive when stdin is a terminal; --question answers "
                       "once; piped stdin: one question per line, one conversation.",
                       epilog=CHAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run dir (pretrain, finetune or sft) or a plain LLM folder")
    p.add_argument("--image", help="image to talk about")
    p.add_argument("--question", help="answer this one question and exit")
    p.add_argument("--system", help="system prompt (default: the run's)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--bits", type=int, choices=[4, 8],
                   help="load the LLM in 4 or 8 bits (default: as the run trained)")
    p.add_argument("--no-stream", action="store_true", help="print each answer when complete")
    p.add_argument("--base", help="base LLM folder, when it moved since training")
    p.add_argument("--verbose", action="store_true", help="report decode speed on stderr")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("export", help="write a run's model in another layout")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--format", required=True, choices=["llm", "internlm2", "hf-llava", "xtuner"],
                   help="llm: merged transformers checkpoint; internlm2: merged, InternLM2 "
                   "layout; hf-llava: the whole model as transformers LlavaForConditionalGeneration "
                   "+ AutoProcessor; xtuner: projector/ + llm_adapter/ in XTuner's LLaVA layout")
    p.add_argument("--base", help="base LLM folder, when it moved since training")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-xtuner", help="turn XTuner's LLaVA output (projector/, "
                       "llm_adapter/) into a run dir for chat, eval, export or init_from")
    p.add_argument("xtuner_dir", help="folder with XTuner's projector/ and llm_adapter/")
    p.add_argument("run_dir", help="new run dir to write")
    p.add_argument("--llm", required=True, help="the base InternLM2 folder XTuner trained on")
    p.add_argument("--vision", required=True,
                   help="open_clip name of the vision tower (e.g. ViT-L-14-336-quickgelu)")
    p.add_argument("--vision-weights", help="local weights file of the vision tower")
    p.add_argument("--vision-config", help="open_clip model config JSON to register first")
    p.add_argument("--feature-layer", type=int, default=-2,
                   help="vision block whose patch features feed the projector (default -2)")
    p.set_defaults(func=cmd_import_xtuner)
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
