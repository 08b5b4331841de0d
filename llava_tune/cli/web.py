"""`llava-tune web`: the chat in a browser (a gradio page over inference/web.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava_tune.cli.chat import add_sampling_arguments, generation_settings


def add_listen_arguments(p: argparse.ArgumentParser, port: int) -> None:
    """--host, --port and --listen-public: where a server (web, serve) listens."""
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--listen-public", action="store_true",
                   help="allow a --host other than loopback (e.g. 0.0.0.0): anyone on the "
                   "network can then use the model")


def add_parser(sub) -> None:
    p = sub.add_parser("web", help="chat with a run in the browser (needs pip install -e .[web])",
                       description="A browser chat page (gradio) over the same chat code as "
                       "`chat`: image upload, streaming answers, one conversation per tab.")
    p.add_argument("model", help="run dir (pretrain, finetune or sft), an hf-llava export or a "
                   "plain LLM folder")
    add_listen_arguments(p, port=7860)
    p.add_argument("--system", help="system prompt (default: the run's)")
    add_sampling_arguments(p)
    p.add_argument("--bits", type=int, choices=[4, 8],
                   help="load the LLM in 4 or 8 bits (default: as the run trained)")
    p.add_argument("--base", help="base LLM folder, when it moved since training")
    p.set_defaults(func=cmd_web)


def cmd_web(args: argparse.Namespace) -> int:
    from llava_tune.assembly.model import load_model
    from llava_tune.inference.safety import check_host, is_loopback
    from llava_tune.inference.web import import_gradio, serve

    check_host(args.host, args.listen_public)  # both before the model loads: fail fast
    import_gradio()
    bits = {None: True, 4: "4bit", 8: "8bit"}[args.bits]
    bundle = load_model(args.model, base=args.base, quantization=bits)
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach this machine on port "
              f"{args.port} can use the model (there is no login)", file=sys.stderr)
    app = serve(bundle, host=args.host, port=args.port, listen_public=args.listen_public,
                title=f"llava-tune: {Path(args.model).name}", system=args.system,
                settings=generation_settings(args))
    print(f"llava-tune web chat with {args.model} on {app.local_url} (Ctrl-C stops it)",
          file=sys.stderr, flush=True)
    app.block_thread()
    return 0
