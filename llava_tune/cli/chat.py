"""`llava-tune chat`: an interactive REPL, one-shot questions and piped questions over one
ChatSession (inference/chat.py), answers streamed as they are generated."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava_tune.errors import UserError


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 512) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)


def generation_settings(args: argparse.Namespace):
    from llava_tune.inference.generate import GenerationSettings

    return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k,
                              repetition_penalty=args.repetition_penalty)


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a run (or an LLM folder), with images",
                       description="Interactive when stdin is a terminal; --question answers "
                       "once; piped stdin: one question per line, one conversation.",
                       epilog=CHAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run dir (pretrain, finetune, sft or dpo), a checkpoint of one, an "
                   "hf-llava export or a plain LLM folder")
    p.add_argument("--image", action="append", metavar="PATH",
                   help="image to talk about; repeat for several (all go with the first "
                   "question, in this order)")
    p.add_argument("--video", action="append", metavar="PATH",
                   help="video (a file, or a folder of frames) to talk about, sampled to the "
                   "run's data.video_frames; repeat for several (after the images)")
    p.add_argument("--question", help="answer this one question and exit")
    p.add_argument("--system", help="system prompt (default: the run's)")
    add_sampling_arguments(p)
    p.add_argument("--seed", type=int)
    p.add_argument("--bits", type=int, choices=[4, 8],
                   help="load the LLM in 4 or 8 bits (default: as the run trained)")
    p.add_argument("--no-stream", action="store_true", help="print each answer when complete")
    p.add_argument("--base", help="base LLM folder, when it moved since training")
    p.add_argument("--verbose", action="store_true", help="report decode speed on stderr")
    p.set_defaults(func=cmd_chat)


CHAT_HELP = """commands:
  /image PATH   add an image to the conversation (it goes with the next question)
  /video PATH   add a video (a file or a folder of frames), as /image
  /reset        start a new conversation, without images
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

    from llava_tune.inference.chat import LOOP_NOTE

    printer = _Printer(session.bundle.tokenizer, sys.stdout if stream else io.StringIO())
    start = time.perf_counter()
    answer = session.ask(question, streamer=printer.streamer)
    print() if stream else print(answer)
    if session.stopped_looping:
        print(f"({LOOP_NOTE})", file=sys.stderr)
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
    if command in ("/image", "/video"):
        what = command[1:]
        if not argument:
            raise UserError(f"{command} needs a path: {command} PATH")
        (session.attach_video if what == "video" else session.attach_image)(argument)
        pending = len(session.pending_images)
        goes = "it goes" if pending == 1 else f"{pending} images go"
        print(f"({what} {argument} added; {goes} with the next question)", file=sys.stderr)
    elif command == "/reset":
        session.reset()
        print("(new conversation, no images)", file=sys.stderr)
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
    if session.image_note:
        print(f"({session.image_note}: /image PATH attaches one)", file=sys.stderr)
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

    from llava_tune.assembly.model import load_model
    from llava_tune.data.image import load_image
    from llava_tune.inference.chat import ChatSession

    interactive = args.question is None and sys.stdin.isatty()
    images = args.image or []
    videos = args.video or []
    if not interactive:
        for path in images:
            load_image(path)  # a typo should not wait for a 7B model to load
        for path in videos:
            if not Path(path).exists():
                raise UserError(f"video {path} not found")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    bits = {None: True, 4: "4bit", 8: "8bit"}[args.bits]
    bundle = load_model(args.model, base=args.base, quantization=bits)
    session = ChatSession(bundle, system=args.system or bundle.template.default_system,
                          settings=generation_settings(args))
    # Images first, then videos: each kind in the order given.
    for attach, path in [(session.attach_image, p) for p in images] + [
            (session.attach_video, p) for p in videos]:
        try:
            attach(path)
        except UserError as err:
            if not interactive:
                raise
            print(f"error: {err}", file=sys.stderr)
    if session.image_note and not interactive:
        print(f"note: {session.image_note} (--image PATH attaches one)", file=sys.stderr)
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
