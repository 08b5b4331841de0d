"""`llava-tune`: the command line. Parses, calls the library, prints; nothing else.

Every command imports what it needs when it runs, so `llava-tune --help` starts without torch.
A user's mistake (UserError) prints one line of `error: ...` and exits 2; anything else is a bug
and keeps its traceback (`--debug` shows tracebacks for user errors too).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from llava_tune.cli import chat, commands, configs, serve, web
from llava_tune.errors import UserError

USER_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)
"""OSErrors that are the user's to fix (besides PermissionError): a full or read-only disk."""


GLOBAL_FLAGS = {"--debug": "show a traceback for every error, user errors too",
                "--quiet": "no progress bars"}
"""Flags accepted before the command and after it (`llava-tune chat RUN --debug`)."""


def version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("llava-tune")
    except metadata.PackageNotFoundError:
        import llava_tune

        return llava_tune.__version__


def _add_global_flags(parser: argparse.ArgumentParser, default: object) -> None:
    for flag, help_text in GLOBAL_FLAGS.items():
        parser.add_argument(flag, action="store_true", default=default, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-tune", description="Give an InternLM2 chat model eyes: LLaVA-style "
        "pretrain + QLoRA finetune, text SFT, chat, eval and export.")
    parser.add_argument("--version", action="version", version=f"llava-tune {version()}")
    _add_global_flags(parser, False)
    # Not required: without a command, main() prints the help instead of a usage error.
    sub = parser.add_subparsers(dest="command")
    commands.add_train(sub)
    commands.add_eval(sub)
    chat.add_parser(sub)
    web.add_parser(sub)
    serve.add_parser(sub)
    commands.add_export(sub)
    commands.add_import_xtuner(sub)
    commands.add_plot(sub)
    configs.add_parser(sub)
    for command in _all_subparsers(sub):
        # SUPPRESS: a flag not given after the command keeps the value given before it
        # (a plain default would overwrite it).
        _add_global_flags(command, argparse.SUPPRESS)
    return parser


def _all_subparsers(sub) -> list[argparse.ArgumentParser]:
    """Every command's parser, nested ones (`configs copy`) included."""
    found = []
    for parser in dict.fromkeys(sub.choices.values()):  # aliases share a parser
        found.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += _all_subparsers(action)
    return found


def quiet_libraries() -> None:
    """Keep the terminal for our own output: no deprecation notices or per-file loading bars
    from inside the libraries (progress.enable turns the useful bars back on)."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes announces on import that an optional CPU kernel could not be fetched from a
    # model hub; llava-tune never downloads at run time, so that notice only misleads.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    quiet_libraries()
    from llava_tune import progress

    progress.enable(not args.quiet and sys.stderr.isatty())
    try:
        return args.func(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        # Permissions and full or read-only disks are the user's to fix; other OSErrors are
        # bugs until shown otherwise and keep their traceback.
        if args.debug or not (isinstance(err, PermissionError) or err.errno in USER_ERRNOS):
            raise
        print(f"error: {err}; fix the folder's permissions or free space, then run again",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
