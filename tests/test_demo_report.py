"""The demo's closing tables (llava_tune/demo/report.py), from files written by hand."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from llava_tune.demo import report

OPTIONS = {"A": "red", "B": "blue", "C": "green", "D": "orange"}


def write_predictions(path: Path, rows: list[tuple[int, str, str, str]]) -> None:
    """rows: (index, hint, answer letter, prediction); the options are OPTIONS rotated as the
    CircularEval pass (index // 1e6) would have them, the answer given for that pass."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["index", "question", "hint", *OPTIONS, "answer", "category", "prediction"])
        for index, hint, answer, prediction in rows:
            writer.writerow([index, "What color is the shape?", hint, *OPTIONS.values(), answer,
                             "color", prediction])


def test_hint_scores_split_plain_and_circular(tmp_path):
    predictions = tmp_path / "p.tsv"
    write_predictions(predictions, [
        # question 0, with a hint: right in both passes
        (0, "Look carefully.", "A", "red"), (1_000_000, "Look carefully.", "B", "B"),
        # question 1, no hint: right first, wrong in the rotation
        (1, "", "B", "The answer is B."), (1_000_001, "", "C", "A"),
        # question 2, no hint: wrong first, right in the rotation
        (2, "", "C", "blue"), (1_000_002, "", "D", "orange"),
    ])
    scores = report.hint_scores(predictions)
    assert scores == {
        "with hint": {"questions": 1, "plain": 1.0, "circular": 1.0},
        "without hint": {"questions": 2, "plain": 0.5, "circular": 0.0},
    }


def test_report_prints_every_table(tmp_path):
    for stage, (color, shape) in {"pretrain": (0.5, 0.25), "finetune": (1.0, 0.9)}.items():
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "heldout_accuracy.json").write_text(json.dumps({
            "accuracy": (color + shape) / 2,
            "by_question": {"What color is the shape?": {"accuracy": color},
                            "What shape is this?": {"accuracy": shape}}}))
    finetune = tmp_path / "finetune"
    (finetune / "heldout_multiturn_accuracy.json").write_text(json.dumps(
        {"by_turn": {"1": {"accuracy": 0.95}, "2": {"accuracy": 0.975}}}))
    (finetune / "mmbench").mkdir()
    (finetune / "mmbench" / "heldout_mmbench_summary.json").write_text(json.dumps({
        "questions": 3, "overall": 1 / 3,
        "category": {"color": {"accuracy": 1 / 3}, "shape": {"accuracy": 0.0}},
        "plain": {"accuracy": 2 / 3, "category": {"color": {"accuracy": 2 / 3},
                                                 "shape": {"accuracy": 0.0}}}}))
    write_predictions(finetune / "mmbench" / "heldout_mmbench_predictions.tsv",
                      [(0, "Look.", "A", "A"), (1, "", "B", "A"), (2, "", "C", "C")])
    text = report.report(tmp_path)
    lines = text.splitlines()
    assert lines[1].split() == ["pretrain", "0.500", "0.250", "0.375"]
    assert lines[2].split() == ["finetune", "1.000", "0.900", "0.950"]
    assert "accuracy     0.950      0.975" in text
    assert any(line.split() == ["plain", "0.667", "0.000", "0.667"] for line in lines)
    assert any(line.split() == ["with", "hint", "1.000", "1.000", "1"] for line in lines)
    assert any(line.split() == ["without", "hint", "0.500", "0.500", "2"] for line in lines)


def test_report_of_a_folder_without_a_demo_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="heldout_accuracy.json"):
        report.report(tmp_path)
