"""The commands besides chat: train, eval, export, import-xtuner, plot."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llava_tune.errors import UserError


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train one stage from a YAML config")
    p.add_argument("config", help="YAML config (configs/...)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.lr=1e-4 run_dir=runs/x")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run (or another run's checkpoints) in run_dir")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from llava_tune.cli.train_printer import TrainPrinter
    from llava_tune.config import load_config
    from llava_tune.recipes import check_placeholders
    from llava_tune.training import train

    config = load_config(args.config, args.overrides)
    check_placeholders(config, args.config)  # a copied recipe's <path to ...> left unfilled
    result = train(config, on_event=TrainPrinter(bar=not args.quiet and sys.stderr.isatty()),
                   overwrite=args.overwrite)
    return 130 if result.interrupted else 0


def add_eval(sub) -> None:
    from llava_tune.cli import mmbench

    p = sub.add_parser("eval", help="greedy answers and exact-match accuracy on a data file, "
                       "or MMBench-format multiple choice")
    p.add_argument("run_dir", help="run dir, a checkpoint of one, an hf-llava export or an "
                   "LLM folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="LLaVA-format JSON/JSONL with reference answers")
    mmbench.add_arguments(p, source)
    p.add_argument("--image-folder", help="folder the records' image paths are relative to")
    p.add_argument("--out", help="--data: write predictions as JSONL (id, question, prediction, "
                   "answer); --mmbench: a folder for the predictions TSV (MMBench's submission "
                   "layout) and the summary JSON")
    p.add_argument("--json", help="write the accuracy summary as JSON")
    p.add_argument("--base", help="base LLM folder, when it moved since training")
    p.add_argument("--batch-size", type=int, default=None,
                   help="questions answered together (default 16 on a GPU, 8 on the CPU)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.mmbench is not None:
        from llava_tune.cli.mmbench import cmd_eval_mmbench

        return cmd_eval_mmbench(args)
    if args.circular:
        raise UserError("--circular is for --mmbench (CircularEval of multiple-choice questions)")

    from llava_tune import progress
    from llava_tune.assembly.model import load_model
    from llava_tune.files import write_text_atomic
    from llava_tune.inference.evaluate import check_output, evaluate
    from llava_tune.inference.generate import GenerationSettings, eval_batch_size

    check_output(args.out, "--out")
    check_output(args.json, "--json")
    outputs = [Path(p).resolve() for p in (args.out, args.json) if p]
    if Path(args.data).resolve() in outputs or len(set(outputs)) < len(outputs):
        raise UserError("--out, --json and --data must be three different files (an output "
                        "would overwrite the data or the other output)")
    batch_size = eval_batch_size(args.batch_size)
    bundle = load_model(args.run_dir, base=args.base)
    bar = progress.Bar(0, desc="evaluating", unit="question")
    try:
        summary = evaluate(bundle, args.data, args.image_folder,
                           GenerationSettings(max_new_tokens=args.max_new_tokens), batch_size,
                           out=args.out, on_progress=bar.reached,
                           on_skip=lambda message: print(f"skipped {message}", file=sys.stderr))
    except KeyboardInterrupt:
        if args.out:
            print(f"the predictions made so far are in {args.out}.partial", file=sys.stderr)
        raise
    finally:
        bar.close()
    result = summary.as_dict()
    print(f"accuracy {summary.accuracy:.4f} ({summary.correct}/{summary.total})")
    for question, stats in result.get("by_question", {}).items():
        print(f"  {stats['accuracy']:.4f}  {question} (n={stats['total']})")
    for turn, stats in result.get("by_turn", {}).items():
        print(f"  {stats['accuracy']:.4f}  answer {turn} of a conversation (n={stats['total']})")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(result, indent=2))
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a run's model in another layout")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--format", required=True,
                   choices=["llm", "internlm2", "hf-llava", "hf-llava-next", "hf-llava-onevision",
                            "xtuner"],
                   help="llm: merged transformers checkpoint; internlm2: merged, InternLM2 "
                   "layout; hf-llava: the whole model as transformers LlavaForConditionalGeneration "
                   "+ AutoProcessor; hf-llava-next: the same for an anyres run, as "
                   "LlavaNextForConditionalGeneration; hf-llava-onevision: an anyres run with "
                   "model.anyres.multi_image=square (several images, video) as "
                   "LlavaOnevisionForConditionalGeneration; xtuner: projector/ + llm_adapter/ (+ "
                   "visual_encoder_adapter/) in XTuner's LLaVA layout")
    p.add_argument("--base", help="base LLM folder, when it moved since training")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty out_dir: a previous export there is replaced, "
                   "anything else is moved aside (never deleted)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from llava_tune.export import export

    result = export(args.run_dir, args.out_dir, args.format, base=args.base, force=args.force)
    if result.moved_aside is not None:
        print(f"the previous contents of {args.out_dir} are now in {result.moved_aside}",
              file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"exported {args.format} to {result.path}")
    return 0


def add_import_xtuner(sub) -> None:
    p = sub.add_parser("import-xtuner", help="turn XTuner's LLaVA output (projector/, "
                       "llm_adapter/, visual_encoder_adapter/) into a run dir for chat, eval, "
                       "export or init_from")
    p.add_argument("xtuner_dir", help="folder with XTuner's projector/, llm_adapter/ and "
                   "visual_encoder_adapter/ (xtuner_config.py is read, never executed)")
    p.add_argument("run_dir", help="new run dir to write")
    p.add_argument("--llm", required=True, help="the base InternLM2 folder XTuner trained on")
    p.add_argument("--vision", default="ViT-L-14-336-quickgelu",
                   help="open_clip name of the vision tower (default ViT-L-14-336-quickgelu); "
                   "ignored when --vision-weights is a Hugging Face CLIP folder")
    p.add_argument("--vision-weights", help="the vision tower: a Hugging Face CLIP folder "
                   "(e.g. openai/clip-vit-large-patch14-336) or an open_clip weights file")
    p.add_argument("--vision-config", help="open_clip model config JSON to register first")
    p.add_argument("--feature-layer", type=int, default=None,
                   help="vision block whose patch features feed the projector (default: "
                   "xtuner_config.py's visual_select_layer, else -2)")
    p.set_defaults(func=cmd_import_xtuner)


def cmd_import_xtuner(args: argparse.Namespace) -> int:
    from llava_tune.convert.xtuner import import_xtuner

    path = import_xtuner(args.xtuner_dir, args.run_dir, llm=args.llm, vision_name=args.vision,
                         vision_pretrained=args.vision_weights,
                         vision_config_file=args.vision_config, feature_layer=args.feature_layer,
                         on_note=print)
    print(f"imported {args.xtuner_dir} as run dir {path}")
    return 0


def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="plot the loss curves of one or more runs")
    p.add_argument("runs", nargs="+", help="run dirs (their metrics.jsonl)")
    p.add_argument("--out", help="PNG to write (default: RUN/loss.png for one run, "
                   "loss.png here for several)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from llava_tune.training.plot import plot_runs

    runs = [Path(r) for r in args.runs]
    out = Path(args.out) if args.out else (runs[0] / "loss.png" if len(runs) == 1
                                           else Path("loss.png"))
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a .png file name")
    print(f"wrote {plot_runs(runs, out)}")
    return 0
