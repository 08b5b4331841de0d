"""`llava-tune configs`: list the shipped recipes; `llava-tune configs copy NAME DEST.yaml`
writes one to edit, with its paths as placeholders (XTuner's list-cfg / copy-cfg)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("configs", help="list the shipped recipes (model, stage, what trains, "
                       "memory); `configs copy NAME DEST.yaml` writes one to edit",
                       description="Without a subcommand: list the shipped recipes.")
    p.set_defaults(func=cmd_list)
    actions = p.add_subparsers(dest="configs_command")
    actions.add_parser("list", help="list the shipped recipes (the default)").set_defaults(
        func=cmd_list)
    copy = actions.add_parser("copy", help="write a recipe to edit, its paths as placeholders "
                              "to fill in")
    copy.add_argument("name", help="a recipe name from `llava-tune configs`, e.g. "
                      "internlm2_chat_1_8b/finetune")
    copy.add_argument("dest", help="the YAML file to write (never overwritten), or a folder")
    copy.set_defaults(func=cmd_copy)


def cmd_list(args: argparse.Namespace) -> int:
    from llava_tune.recipes import list_recipes

    recipes = list_recipes()
    columns = ("NAME", "MODEL", "STAGE", "TRAINS", "MEMORY")
    rows = [(r.name, r.model, r.config.stage, r.trains, r.memory) for r in recipes]
    widths = [max(len(row[i]) for row in [columns, *rows]) for i in range(len(columns) - 1)]
    for row in [columns, *rows]:
        print("  ".join(f"{cell:{w}s}" for cell, w in zip(row[:-1], widths, strict=True))
              + "  " + row[-1])
    print("\nMEMORY: GPU memory per process, estimated by scripts/estimate_memory.py (add 1-2 GB "
          "for the CUDA context); the demo recipes run on the CPU.\n"
          "Copy one to edit: llava-tune configs copy NAME DEST.yaml")
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    from llava_tune.recipes import copy_recipe

    dest, replaced = copy_recipe(args.name, args.dest)
    print(f"wrote {dest}; fill in its placeholders:")
    for key, value in replaced.items():
        print(f"  {key}: {value}")
    print(f"then: llava-tune train {dest}")
    return 0
