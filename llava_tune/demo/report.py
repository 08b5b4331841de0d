"""The embedded demo's closing tables, from the files its steps wrote (scripts/demo.sh).

    python -m llava_tune.demo.report OUT_DIR [--dpo]

- held-out questions after each stage (color, shape, both);
- the held-out two-turn conversations after stage 2, first answer and follow-up apart;
- the MMBench-format lettered questions after stage 2, plain and CircularEval, per category,
  and for the rows with a hint and without one (MMBench's rows carry a hint on part of them;
  a model that reads only hint-less prompts fails the others);
- with --dpo, after the third stage (scripts/dpo.sh demo): the held-out pairs' reward
  accuracy and margin, and the held-out questions after stage 2 and after dpo.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from llava_tune.demo import shapes
from llava_tune.inference.mmbench import CIRCULAR_OFFSET, extract_letter
from llava_tune.training.metrics import read_metrics

OPTION_LETTERS = ("A", "B", "C", "D")


def hint_scores(predictions_tsv: Path) -> dict[str, dict[str, float]]:
    """Plain and circular accuracy of the questions with a hint and without, from an
    `eval --mmbench` predictions file (one row per pass; rotations share index % 1e6)."""
    with open(predictions_tsv, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    passes: dict[int, list[bool]] = {}
    hinted: dict[int, bool] = {}
    for row in rows:
        group = int(row["index"]) % CIRCULAR_OFFSET
        options = {k: row[k] for k in OPTION_LETTERS if row.get(k)}
        passes.setdefault(group, []).append(
            extract_letter(row["prediction"], options) == row["answer"])
        hinted[group] = bool(row.get("hint"))
    scores = {}
    for name, want in (("with hint", True), ("without hint", False)):
        groups = [g for g in passes if hinted[g] == want]
        if groups:
            scores[name] = {"questions": len(groups),
                            "plain": sum(passes[g][0] for g in groups) / len(groups),
                            "circular": sum(all(passes[g]) for g in groups) / len(groups)}
    return scores


def report(out: Path) -> str:
    """The demo's tables as text (the files of a finished scripts/demo.sh run in `out`)."""
    lines = [f"{'stage':10s} {'color':>7s} {'shape':>7s} {'both':>7s}"]
    for stage in ("pretrain", "finetune"):
        summary = json.loads((out / stage / "heldout_accuracy.json").read_text())
        by_question = summary["by_question"]
        lines.append(f"{stage:10s} {by_question[shapes.COLOR_QUESTION]['accuracy']:7.3f} "
                     f"{by_question[shapes.SHAPE_QUESTION]['accuracy']:7.3f} "
                     f"{summary['accuracy']:7.3f}")
    multiturn = out / "finetune" / "heldout_multiturn_accuracy.json"
    if multiturn.is_file():
        turns = json.loads(multiturn.read_text())["by_turn"]
        lines += ["", "Two questions about one held-out image in one conversation, after stage 2:",
                  f"{'':10s} {'first':>7s} {'follow-up':>10s}",
                  f"{'accuracy':10s} {turns['1']['accuracy']:7.3f} {turns['2']['accuracy']:10.3f}"]
    mmbench_dir = out / "finetune" / "mmbench"
    summary_file = mmbench_dir / "heldout_mmbench_summary.json"
    if summary_file.is_file():
        m = json.loads(summary_file.read_text())
        lines += ["", f"MMBench-format, after stage 2 ({m['questions']} lettered questions about "
                  "new images, about half with a hint):",
                  f"{'':14s} {'color':>7s} {'shape':>7s} {'all':>7s}"]
        for name, scores in (("plain", m["plain"]), ("circular", m)):
            category = scores["category"]
            overall = scores["accuracy"] if name == "plain" else scores["overall"]
            lines.append(f"{name:14s} {category['color']['accuracy']:7.3f} "
                         f"{category['shape']['accuracy']:7.3f} {overall:7.3f}")
        by_hint = hint_scores(mmbench_dir / "heldout_mmbench_predictions.tsv")
        lines.append(f"{'':14s} {'plain':>7s} {'circular':>9s} {'questions':>10s}")
        for name, scores in by_hint.items():
            lines.append(f"{name:14s} {scores['plain']:7.3f} {scores['circular']:9.3f} "
                         f"{scores['questions']:10d}")
    return "\n".join(lines)


def dpo_scores(out: Path) -> dict[str, float]:
    """The third stage's numbers: the held-out pairs' rewards (the run's last evaluation in
    its metrics.jsonl) and held-out exact match after stage 2 and after dpo."""
    evals = [row for row in read_metrics(out / "dpo" / "metrics.jsonl") if "eval_loss" in row]
    if not evals:
        raise SystemExit(f"{out / 'dpo' / 'metrics.jsonl'} has no evaluation (data.eval)")
    last = evals[-1]
    scores = {"reward_accuracy": last["eval_rewards/accuracy"],
              "reward_margin": last["eval_rewards/margin"]}
    for stage in ("finetune", "dpo"):
        summary = json.loads((out / stage / "heldout_accuracy.json").read_text())
        scores[f"exact_match_{stage}"] = summary["accuracy"]
    return scores


def dpo_report(out: Path) -> str:
    s = dpo_scores(out)
    return "\n".join([
        "Preference training (stage dpo) after stage 2, on held-out pairs and questions:",
        f"  reward accuracy {s['reward_accuracy']:.3f} (margin {s['reward_margin']:.3f})",
        f"  exact match: after stage 2 {s['exact_match_finetune']:.3f}, after dpo "
        f"{s['exact_match_dpo']:.3f}"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dpo", action="store_true", help="the third stage's numbers")
    args = parser.parse_args(argv)
    print(dpo_report(args.out_dir) if args.dpo else report(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
