"""`llava-tune serve`: the model behind an OpenAI-compatible API (inference/server.py)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from llava_tune.cli.chat import add_sampling_arguments, generation_settings
from llava_tune.cli.web import add_listen_arguments
from llava_tune.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a run through an OpenAI-compatible API (needs pip "
                       "install -e .[serve])",
                       description="POST /v1/chat/completions (text and image_url parts, "
                       "stream) and GET /v1/models, as OpenAI's API; concurrent requests are "
                       "answered in batches.")
    p.add_argument("model", help="run dir (pretrain, finetune, sft or dpo), a checkpoint of "
                   "one, an hf-llava export or a plain LLM folder")
    add_listen_arguments(p, port=8000)
    p.add_argument("--api-key", help="the key every request must send as 'Authorization: "
                   "Bearer KEY' (default: $LLAVA_TUNE_API_KEY; the environment keeps it out of "
                   "the process list)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the "
                   "MODEL folder's name)")
    p.add_argument("--system", help="system prompt when a request has none (default: the run's)")
    add_sampling_arguments(p)
    p.add_argument("--max-batch", type=int, default=None,
                   help="requests generated together (default 16 on a GPU, 8 on the CPU)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait; past it: 503 with Retry-After")
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096 * 2,
                   help="pixels of all of a request's images together")
    p.add_argument("--max-body-mb", type=float, default=32, help="request body size, in MiB")
    p.add_argument("--max-tokens-limit", type=int, default=2048,
                   help="the largest max_tokens a request may ask")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="the longest prompt (default: the model's context)")
    p.add_argument("--allow-local-images", metavar="DIR",
                   help="accept file:// image URLs of files under DIR (refused by default)")
    p.add_argument("--bits", type=int, choices=[4, 8],
                   help="load the LLM in 4 or 8 bits (default: as the run trained)")
    p.add_argument("--base", help="base LLM folder, when it moved since training")
    p.set_defaults(func=cmd_serve)


def _limits(args: argparse.Namespace):
    from llava_tune.inference.api import Limits

    problems = [f"{flag} {value} must be at least 1" for flag, value in [
        ("--max-batch", args.max_batch or 1), ("--max-images", args.max_images),
        ("--max-pixels", args.max_pixels), ("--max-tokens-limit", args.max_tokens_limit),
        ("--max-prompt-tokens", args.max_prompt_tokens or 1), ("--max-queue", args.max_queue),
        ("--max-new-tokens", args.max_new_tokens)] if value < 1]
    if args.max_body_mb <= 0:
        problems.append(f"--max-body-mb {args.max_body_mb} must be more than 0")
    folder = Path(args.allow_local_images) if args.allow_local_images else None
    if folder is not None and not folder.is_dir():
        problems.append(f"--allow-local-images {folder} is not a folder")
    if problems:
        raise UserError("; ".join(problems))
    return Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_images=args.max_images,
                  max_pixels=args.max_pixels, max_tokens=args.max_tokens_limit,
                  max_prompt_tokens=args.max_prompt_tokens, allow_local_images=folder)


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from llava_tune.assembly.model import load_model
    from llava_tune.inference.generate import eval_batch_size
    from llava_tune.inference.safety import check_host, is_loopback
    from llava_tune.inference.server import (
        API_KEY_ENV,
        ApiServer,
        ServeOptions,
        import_server_stack,
    )

    # Everything a user can get wrong, before the model loads: fail fast.
    check_host(args.host, args.listen_public)
    import_server_stack()
    limits = _limits(args)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    bits = {None: True, 4: "4bit", 8: "8bit"}[args.bits]
    bundle = load_model(args.model, base=args.base, quantization=bits)
    if args.system:
        bundle = replace(bundle, template=replace(bundle.template, default_system=args.system))
    name = args.served_model_name or Path(args.model).resolve().name
    options = ServeOptions(name, generation_settings(args), limits, api_key,
                           eval_batch_size(args.max_batch), args.max_queue)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    server = ApiServer(bundle, options, args.host, args.port, args.listen_public).start()
    if not is_loopback(args.host) and not api_key:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach "
              f"this machine on port {server.port} can use the model (set ${API_KEY_ENV})",
              file=sys.stderr)
    print(f"llava-tune serve: {name} on {server.url}/v1 (OpenAI-compatible; Ctrl-C stops "
          "it)", file=sys.stderr, flush=True)
    # SIGTERM (a service manager's stop; also what reaches a server whose parent ignores
    # SIGINT) ends it as Ctrl-C does: the running batch first.
    signal.signal(signal.SIGTERM, lambda signum, frame: server.stop_soon())
    server.wait()
    return 0
