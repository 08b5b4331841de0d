"""Predictions, scores and the output files (MMBench's submission TSV, a JSON summary)."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from llava_tune.errors import UserError
from llava_tune.inference.mmbench.tsv import (
    OPTION_COLUMNS,
    MMBenchRow,
)

if TYPE_CHECKING:
    from llava_tune.data.template import Message
    from llava_tune.inference.mmbench.evaluate import (
        MMBenchPass,  # the template module pulls in transformers; only its type is needed here
    )

MAX_BAD_FRACTION = 0.05
"""Rows with undecodable images are skipped up to this fraction (and at least one row)."""

AnswerFn = Callable[["list[Message]", "list[Image.Image]"], str]
BatchAnswerFn = Callable[["list[tuple[list[Message], list[Image.Image]]]"], "list[str]"]
ProgressFn = Callable[[int, int], None]
"""Called with (passes done, passes in all) after each batch; skipped passes count as done."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class MMBenchPrediction:
    """One answered pass."""

    index: int
    group: int
    prediction: str
    """The model's answer as generated."""
    letter: str | None
    """What `extract_letter` made of it."""
    answer: str | None

    @property
    def hit(self) -> bool | None:
        return None if self.answer is None else self.letter == self.answer


@dataclass(frozen=True)
class Score:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total}


@dataclass(frozen=True)
class SkippedRow:
    index: int
    line: int
    reason: str


@dataclass
class MMBenchResult:
    """Scores of one evaluation; accuracies are fractions in [0, 1], None without answers."""

    tsv: Path
    circular: bool
    circular_source: str | None
    overall: Score | None
    category: dict[str, Score]
    l2_category: dict[str, Score]
    n_questions: int
    """Questions (circular groups) asked and not skipped."""
    n_unscored: int
    """Of those, questions without an answer key (test split)."""
    n_rows: int
    """Rows of the file that were asked (or would have been, skipped ones included)."""
    n_unused_copies: int
    skipped: list[SkippedRow]
    skipped_questions: int
    predictions: list[MMBenchPrediction] = field(repr=False)
    plain: Score | None = None
    """Plain accuracy: every question's first pass (options as the file has them) alone;
    equals `overall` when not circular, so a circular run gives both scores."""
    plain_category: dict[str, Score] = field(default_factory=dict)
    predictions_file: Path | None = None
    summary_file: Path | None = None

    @property
    def accuracy(self) -> float | None:
        return None if self.overall is None else self.overall.accuracy

    @property
    def n_passes(self) -> int:
        return len(self.predictions)

    @property
    def n_no_letter(self) -> int:
        return sum(p.letter is None for p in self.predictions)

    def summary(self) -> dict:
        """The JSON summary's content."""
        return {
            "tsv": str(self.tsv),
            "circular": self.circular,
            "circular_source": self.circular_source,
            "overall": self.accuracy,
            "correct": None if self.overall is None else self.overall.correct,
            "scored": None if self.overall is None else self.overall.total,
            "questions": self.n_questions,
            "unscored_questions": self.n_unscored,
            "category": {k: v.as_dict() for k, v in self.category.items()},
            "l2-category": {k: v.as_dict() for k, v in self.l2_category.items()},
            "passes": self.n_passes,
            "passes_without_letter": self.n_no_letter,
            "rows": self.n_rows,
            "unused_circular_copies": self.n_unused_copies,
            "skipped_rows": [vars(s) for s in self.skipped],
            "skipped_questions": self.skipped_questions,
            "plain": None if self.plain is None else {
                **self.plain.as_dict(),
                "category": {k: v.as_dict() for k, v in self.plain_category.items()}},
            "predictions_file": None if self.predictions_file is None
            else str(self.predictions_file),
        }


def score_predictions(predictions: Sequence[MMBenchPrediction], rows: Mapping[int, MMBenchRow],
                      skipped_groups: set[int] = frozenset()
                      ) -> tuple[Score | None, dict[str, Score], dict[str, Score], int, int]:
    """(overall, per category, per l2-category, questions, unscored questions).

    A question is the passes of one group; it is right only if every pass is (so a plain run,
    one pass per group, gives plain accuracy). `rows` maps a group to the row whose category
    counts (its index < 1e6 one when present). Groups in `skipped_groups` are left out.
    """
    groups: dict[int, list[MMBenchPrediction]] = {}
    for prediction in predictions:
        if prediction.group not in skipped_groups:
            groups.setdefault(prediction.group, []).append(prediction)
    correct = total = unscored = 0
    tallies: dict[str, dict[str, list[int]]] = {"category": {}, "l2": {}}
    for group, members in groups.items():
        if any(p.answer is None for p in members):
            unscored += 1
            continue
        hit = int(all(p.hit for p in members))
        correct += hit
        total += 1
        row = rows[group]
        for kind, name in (("category", row.category), ("l2", row.l2_category)):
            if name is not None:
                tally = tallies[kind].setdefault(name, [0, 0])
                tally[0] += hit
                tally[1] += 1
    if total == 0:
        return None, {}, {}, len(groups), unscored

    def scores(kind: str) -> dict[str, Score]:
        return {name: Score(c, t) for name, (c, t) in sorted(tallies[kind].items())}

    return Score(correct, total), scores("category"), scores("l2"), len(groups), unscored


# --------------------------------------------------------------------------- output


def output_paths(tsv: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Where an evaluation of `tsv` writes: predictions (TSV), its partial file, summary (JSON)."""
    stem = Path(tsv).stem
    out = Path(out_dir)
    predictions = out / f"{stem}_predictions.tsv"
    return {"predictions": predictions,
            "partial": predictions.with_name(predictions.name + ".partial"),
            "summary": out / f"{stem}_summary.json"}


def check_out_dir(tsv: Path, out_dir: str | os.PathLike) -> dict[str, Path]:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} is a file; pass a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {out} ({err.strerror or err}); "
                        "pass a folder you can write to") from err
    paths = output_paths(tsv, out)
    for path in paths.values():
        if path.is_dir():
            raise UserError(f"{path} is a folder, so the results cannot be written there; "
                            "remove it or pass another output folder")
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"output folder {out} is not writable; pass a folder you can write to")
    return paths


class PredictionWriter:
    """Appends prediction rows to the partial file as they come; `finish` renames it."""

    def __init__(self, paths: dict[str, Path], columns: list[str]) -> None:
        self.paths = paths
        self.columns = [c for c in columns if c != "image"] + ["prediction"]
        try:
            self.handle = open(paths["partial"], "w", encoding="utf-8", newline="")
        except OSError as err:
            raise UserError(f"cannot write {paths['partial']} ({err.strerror or err}); "
                            "pass an output folder you can write to") from err
        # pandas' to_csv(sep="\t") layout: minimal quoting, so MMBench's tools read it back.
        self.writer = csv.writer(self.handle, delimiter="\t", lineterminator="\n")
        self.writer.writerow(self.columns)
        self.handle.flush()

    def write(self, item: MMBenchPass, prediction: str) -> None:
        values = dict(item.row.fields)
        values["index"] = str(item.index)
        for letter in OPTION_COLUMNS:
            if letter in values:
                values[letter] = item.options.get(letter, "")
        if "answer" in values:
            values["answer"] = item.answer or ""
        values["prediction"] = prediction
        self.writer.writerow([values[c] for c in self.columns])

    def flush(self) -> None:
        self.handle.flush()

    def finish(self) -> Path:
        self.handle.close()
        os.replace(self.paths["partial"], self.paths["predictions"])
        return self.paths["predictions"]

    def close(self) -> None:
        self.handle.close()


