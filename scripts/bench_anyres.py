"""What tiles, several images and video frames learn that one padded square cannot, measured.

    python scripts/bench_anyres.py [--train 2000] [--test 200] [--epochs 2] [--seed 0]
        [--arms detail-pad,detail-anyres,pair,clip] [--work runs/bench_anyres] [--out results.json]

Everything is the demo's, on a CPU, nothing downloaded: the demo's tiny InternLM2-architecture
LM (trained first on the demo's text, as scripts/demo.sh does) and its frozen random ViT, which
reads 64-px images as 4 x 4 patches. The data are llava_tune/demo/scenes.py's:

- detail: 256 x 64, 64 x 256 and 128 x 128 images (the ratios of 448 x 112 and 224 x 224 at a
  112-px tower, scaled to the demo's 64-px tower) holding one 20-32 px shape; asked its color
  and its shape. Padded to one 64-px square, the shape shrinks to 5-16 px, under one patch;
  anyres's grids [1,4], [4,1] and [2,2] keep it whole in a tile beside the overview.
- pair: two shape images per record: the color of the shape in the second image, and whether
  the two shapes are the same shape (several images per sample; pad, each its own square).
- clip: 8 frames of a shape that changes color once: its color at the end (video as frames,
  each frame's map pooled 2 x 2, anyres's newline after each frame).

Each arm is one `llava-tune train` of configs/demo/finetune.yaml (projector + QLoRA on the
4-bit LM, the tower frozen and its features cached; no stage 1: the projector starts from its
seeded random init in every arm) for the same --epochs over the same records, then `llava-tune
eval` on held-out scenes. The two detail arms see identical records and steps; they differ only
in model.image_aspect. Reported per arm: held-out exact match (per question), image tokens per
sample, training tokens/s (metrics.jsonl: every non-padding position, image slots included,
over the steps' own time) and wall time. Targets (issue 20): detail anyres >= pad + 0.15;
pair's second-image color >= 0.9; clip >= 0.8. Exit 1 when a target is missed.

Each run is its own process, one after another: never time this beside another job.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DETAIL_SIZES = ((256, 64), (64, 256), (128, 128))
"""(width, height) of the detail images: 4:1, 1:4 and 2x2 tower sides."""
GRIDS = "[[1,4],[4,1],[2,2]]"
"""anyres grids ([rows, cols] in tower sides) that hold the detail images without scaling."""


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str
    """detail | pair | clip: the scenes data it trains and is scored on."""
    overrides: tuple[str, ...]
    target: str
    """What it must reach, for the table."""


ANYRES = ("model.image_aspect=anyres", f"model.anyres.grid_pinpoints={GRIDS}")
ARMS = {
    "detail-pad": Arm("detail-pad", "detail", ("model.image_aspect=pad",), "(the baseline)"),
    "detail-anyres": Arm("detail-anyres", "detail", ANYRES, "pad + 0.15"),
    "pair": Arm("pair", "pair", ("model.image_aspect=pad",), "second-image color >= 0.9"),
    "clip": Arm("clip", "clip", ANYRES, ">= 0.8"),
}


def cli(args: list[str], log: Path) -> float:
    """Run `python -m llava_tune ARGS` in its own process (output to `log`); its seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, "-m", "llava_tune", *args], stdout=out,
                               stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"llava-tune {args[0]} failed (exit {code}); end of {log}:\n{tail}")
    return time.perf_counter() - start


def prepare(work: Path, n_train: int, n_test: int, seed: int, log, n_text: int = 4000) -> dict:
    """The three scenes data sets, the demo's LM trained on the demo's text, and its tower;
    built once under `work` and reused."""
    from llava_tune.demo import make, scenes, shapes

    marker = work / ".prepared.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    data = work / "data"
    log("writing scenes data ...")
    sets = {"detail": scenes.write_detail(data / "detail", n_train, n_test, seed, sizes=DETAIL_SIZES),
            "pair": scenes.write_pairs(data / "pair", n_train, n_test, seed),
            "clip": scenes.write_clips(data / "clip", n_train, n_test, seed)}
    text = data / "text.json"
    shapes.write_json_atomic(text, shapes.text_records(n_text, seed))
    models = work / "models"
    log("making the demo's LM and tower, training the LM on the demo's text ...")
    # The tokenizer learns every word the scenes ask and answer ("second", "Yes", ...).
    make.make_lm(models / "lm-init", [text, *(s["train"] for s in sets.values())], seed)
    make.make_vision(models / "vision", seed)
    cli(["train", "configs/demo/lm.yaml", f"model.llm={models / 'lm-init'}", f"data.train={text}",
         f"data.cache_dir={work / 'cache'}", f"run_dir={models / 'lm-train'}", "--overwrite"],
        work / "logs" / "lm.log")
    cli(["export", str(models / "lm-train"), str(models / "lm"), "--format", "internlm2",
         "--force"], work / "logs" / "lm-export.log")
    prepared = {"sets": {k: {n: str(p) for n, p in s.items()} for k, s in sets.items()},
                "lm": str(models / "lm"), "vision": str(models / "vision")}
    marker.write_text(json.dumps(prepared, indent=2))
    return prepared


def run_arm(arm: Arm, prepared: dict, work: Path, epochs: int, seed: int, log) -> dict:
    """Train the arm, evaluate it on its held-out scenes; its row of the table."""
    data = prepared["sets"][arm.kind]
    vision = Path(prepared["vision"])
    run = work / "runs" / arm.name
    overrides = [
        "init_from=null", f"model.llm={prepared['lm']}",
        f"model.vision.config_file={vision / 'demo-vit.json'}",
        f"model.vision.pretrained={vision / 'demo-vit.safetensors'}",
        f"data.train={data['train']}", f"data.image_folder={data['image_folder']}",
        f"data.feature_cache={work / 'features' / arm.name}", f"data.cache_dir={work / 'cache'}",
        "data.max_length=256", f"train.epochs={epochs}", f"train.seed={seed}",
        f"run_dir={run}", *arm.overrides]
    log(f"[{arm.name}] training ...")
    train_s = cli(["train", "configs/demo/finetune.yaml", *overrides, "--overwrite"],
                  work / "logs" / f"{arm.name}.log")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens" in r and "seconds" in r]
    log(f"[{arm.name}] evaluating ...")
    summary_file = run / "test_accuracy.json"
    cli(["eval", str(run), "--data", str(data["test"]), "--image-folder", str(data["image_folder"]),
         "--out", str(run / "test_predictions.jsonl"), "--json", str(summary_file),
         "--batch-size", "32"], work / "logs" / f"{arm.name}-eval.log")
    summary = json.loads(summary_file.read_text())
    return {"arm": arm.name, "kind": arm.kind, "overrides": list(arm.overrides),
            "accuracy": summary["accuracy"], "total": summary["total"],
            "by_question": {q: v["accuracy"] for q, v in summary.get("by_question", {}).items()},
            "image_tokens": image_tokens(arm, Path(data["train"]), Path(data["image_folder"])), "steps": rows[-1]["step"],
            "tokens_per_s": sum(r["tokens"] for r in steps) / sum(r["seconds"] for r in steps),
            "train_s": round(train_s, 1), "target": arm.target}


def image_tokens(arm: Arm, records_file: Path, image_folder: Path) -> float:
    """Mean image tokens per training sample of the arm: models/anyres.py's count for the
    demo tower (its side and patch grid) and the arm's image_aspect."""
    from llava_tune.data.image import image_size
    from llava_tune.demo.make import VISION_CONFIG
    from llava_tune.models.anyres import ImageLayout

    tower = VISION_CONFIG["vision_cfg"]
    grids = tuple(tuple(g) for g in json.loads(GRIDS)) if ANYRES[0] in arm.overrides else ()
    layout = ImageLayout(tile=tower["image_size"], patches=tower["image_size"] // tower["patch_size"],
                         grids=grids, pool_max=None)
    total, records = 0, json.loads(records_file.read_text())
    for record in records:
        if "video" in record:
            total += layout.video_tokens()
        images = record.get("image", [])
        for image in [images] if isinstance(images, str) else images:
            total += layout.num_tokens(image_size(image_folder / image) if grids else None)
    return total / len(records)


def verdicts(results: dict[str, dict]) -> dict[str, bool]:
    """Each issue-20 target the results can judge: met or not."""
    from llava_tune.demo import scenes

    out = {}
    if "detail-pad" in results and "detail-anyres" in results:
        out["detail: anyres >= pad + 0.15"] = (results["detail-anyres"]["accuracy"]
                                               >= results["detail-pad"]["accuracy"] + 0.15)
    if "pair" in results:
        first = results["pair"]["by_question"].get(scenes.PAIR_COLOR_QUESTION)
        out["pair: second-image color >= 0.9"] = first is not None and first >= 0.9
    if "clip" in results:
        out["clip: >= 0.8"] = results["clip"]["accuracy"] >= 0.8
    return out


def table(results: dict[str, dict]) -> str:
    lines = [f"{'arm':14s} {'held-out':>9s} {'per question':32s} {'image tok':>9s} "
             f"{'steps':>6s} {'tokens/s':>9s} {'train s':>8s}  target"]
    for r in results.values():
        per = ", ".join(f"{_short(q)} {a:.3f}" for q, a in r["by_question"].items())
        lines.append(f"{r['arm']:14s} {r['accuracy']:9.3f} {per:32s} {r['image_tokens']:9.1f} "
                     f"{r['steps']:6d} "
                     f"{r['tokens_per_s']:9.0f} {r['train_s']:8.0f}  {r['target']}")
    return "\n".join(lines)


def _short(question: str) -> str:
    """The table's name for a held-out question."""
    from llava_tune.demo import scenes, shapes

    names = {shapes.COLOR_QUESTION: "color", shapes.SHAPE_QUESTION: "shape",
             scenes.PAIR_COLOR_QUESTION: "2nd color", scenes.PAIR_SAME_QUESTION: "same shape",
             scenes.CLIP_END_QUESTION: "end color", scenes.CLIP_START_QUESTION: "start color"}
    return names.get(question, question)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2000, help="training images (pairs, clips)")
    parser.add_argument("--test", type=int, default=200, help="held-out images (pairs, clips)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--text", type=int, default=4000,
                        help="text records the demo's LM first learns the language from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"some of {','.join(ARMS)}")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_anyres",
                        help="data, models and runs (data and models are reused)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        parser.error(f"--arms {args.arms!r}: choose from {','.join(ARMS)}")
    if min(args.train, args.test, args.epochs, args.text) < 1:
        parser.error("--train, --test, --epochs and --text must be at least 1")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    work = args.work.resolve()
    start = time.perf_counter()
    prepared = prepare(work, args.train, args.test, args.seed, log, args.text)
    results = {name: run_arm(ARMS[name], prepared, work, args.epochs, args.seed, log)
               for name in arms}
    met = verdicts(results)
    print(f"\n{args.train} training / {args.test} held-out scenes per arm, {args.epochs} epochs, "
          f"seed {args.seed}, {time.perf_counter() - start:.0f} s in all")
    print(table(results))
    for target, ok in met.items():
        print(f"{'met   ' if ok else 'MISSED'} {target}")
    if args.out:
        args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                        "results": results, "targets": met}, indent=2) + "\n")
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
