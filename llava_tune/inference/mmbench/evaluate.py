"""Asking every question (every rotation for CircularEval), scoring, and the output files."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from llava_tune.errors import UserError
from llava_tune.files import write_text_atomic
from llava_tune.inference.mmbench.answers import build_messages, extract_letter, rotate_options
from llava_tune.inference.mmbench.tsv import (
    CIRCULAR_OFFSET,
    OPTION_COLUMNS,
    MMBenchImageError,
    MMBenchRow,
    MMBenchTSV,
)

if TYPE_CHECKING:  # the template module pulls in transformers; only its type is needed here
    from llava_tune.data.template import Message

MAX_BAD_FRACTION = 0.05
"""Rows with undecodable images are skipped up to this fraction (and at least one row)."""

AnswerFn = Callable[["list[Message]", "list[Image.Image]"], str]
BatchAnswerFn = Callable[["list[tuple[list[Message], list[Image.Image]]]"], "list[str]"]
ProgressFn = Callable[[int, int], None]
"""Called with (passes done, passes in all) after each batch; skipped passes count as done."""


# --------------------------------------------------------------------------- passes


@dataclass(frozen=True)
class MMBenchPass:
    """One question put to the model: a row, maybe with its options rotated."""

    row: MMBenchRow
    index: int
    """The index written to the predictions: the row's, + shift * 1e6 for a generated rotation."""
    shift: int
    options: dict[str, str]
    answer: str | None

    @property
    def group(self) -> int:
        return self.row.group

    def messages(self) -> list[Message]:
        return build_messages(self.row.question, self.options, self.row.hint)


def plan_passes(tsv: MMBenchTSV, circular: bool) -> tuple[list[MMBenchPass], str | None, int]:
    """The passes to ask, how circular evaluation is done, and how many file copies are unused.

    - circular, file with copies (some index >= 1e6): every row is asked as written; a
      question is its rows of equal `index % 1e6` (source "file").
    - circular, file without copies: each row is asked once per option, rotated by
      `rotate_options` with shift 0..N-1; the rotations get indexes `index + shift * 1e6`,
      as MMBench numbers its copies (source "generated").
    - not circular: each row with index < 1e6 is asked once as written; a file's circular
      copies are not asked (their count is returned), so the score is plain accuracy.
    Returns (passes, "file" | "generated" | None, unused copies).
    """
    passes: list[MMBenchPass] = []
    if circular and tsv.has_circular_copies:
        for row in tsv.rows:
            passes.append(MMBenchPass(row, row.index, 0, dict(row.options), row.answer))
        return passes, "file", 0
    unused = 0
    for row in tsv.rows:
        if row.index >= CIRCULAR_OFFSET:
            unused += 1
            continue
        shifts = range(len(row.options)) if circular else range(1)
        for shift in shifts:
            options, answer = rotate_options(row.options, row.answer, shift)
            passes.append(MMBenchPass(row, row.index + shift * CIRCULAR_OFFSET, shift,
                                      options, answer))
    return passes, ("generated" if circular else None), unused


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


def _check_out_dir(tsv: Path, out_dir: str | os.PathLike) -> dict[str, Path]:
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


class _PredictionWriter:
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


# --------------------------------------------------------------------------- evaluation


def evaluate_mmbench(
    tsv: str | os.PathLike,
    answer: AnswerFn,
    circular: bool = False,
    out_dir: str | os.PathLike | None = None,
    on_progress: ProgressFn | None = None,
    *,
    max_bad_fraction: float = MAX_BAD_FRACTION,
) -> MMBenchResult:
    """Ask `answer(messages, [image])` every question of an MMBench TSV and score the answers.

    One question at a time; `evaluate_mmbench_batched` has the details (outputs, skipped
    rows, circular evaluation).
    """
    def one_at_a_time(batch: list[tuple[list[Message], list[Image.Image]]]) -> list[str]:
        return [answer(messages, images) for messages, images in batch]

    return evaluate_mmbench_batched(tsv, one_at_a_time, circular, out_dir, on_progress,
                                    batch_size=1, max_bad_fraction=max_bad_fraction)


def evaluate_mmbench_batched(
    tsv: str | os.PathLike,
    answer_batch: BatchAnswerFn,
    circular: bool = False,
    out_dir: str | os.PathLike | None = None,
    on_progress: ProgressFn | None = None,
    *,
    batch_size: int = 8,
    max_bad_fraction: float = MAX_BAD_FRACTION,
) -> MMBenchResult:
    """Ask every question of an MMBench TSV, up to `batch_size` at a time, and score them.

    Args:
        tsv: the MMBench TSV (`MMBenchTSV.read` says what it must hold).
        answer_batch: [(messages, [image]), ...] -> [answer text, ...], same length; messages
            are `build_messages`' one user turn, the image an RGB PIL image (the rotations of
            a row get the same image object: do not modify it).
        circular: CircularEval (`plan_passes` says how for either kind of file).
        out_dir: where `output_paths` go: the predictions TSV in MMBench's submission layout
            (the file's columns without `image`, plus `prediction`; one row per pass, rotated
            options and answer for generated rotations), appended to `*.partial` as answers
            come and renamed at the end, and the JSON summary (`MMBenchResult.summary`).
            Checked before any question is asked. None writes nothing.
        on_progress: called with (passes done, passes in all) after each batch.
        max_bad_fraction: rows whose image cannot be decoded are skipped (with their whole
            question) and listed; more than this fraction of the asked rows (at least one row
            is always tolerated) raises UserError, as soon as that many are found.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tsv = Path(tsv)
    paths = _check_out_dir(tsv, out_dir) if out_dir is not None else None
    data = MMBenchTSV.read(tsv)
    passes, circular_source, unused = plan_passes(data, circular)
    positions = list(dict.fromkeys(item.row.position for item in passes))
    allowed = max(1, int(max_bad_fraction * len(positions)))
    bad: dict[int, str] = {}

    def mark_bad(position: int, reason: str) -> None:
        bad[position] = reason
        if len(bad) > allowed:
            listed = "; ".join(f"{data.rows[p].where()}: {r}" for p, r in list(bad.items())[:5])
            raise UserError(
                f"{tsv}: {len(bad)} of {len(positions)} rows have an image that cannot be "
                f"decoded (more than {max_bad_fraction:.0%}), e.g. {listed}. The file is "
                "damaged or its image column is not base64-encoded images; get a fresh copy")

    for position in positions:
        if position in data.bad:
            mark_bad(position, data.bad[position])

    writer = _PredictionWriter(paths, data.columns) if paths is not None else None
    predictions: list[MMBenchPrediction] = []
    done = 0
    cache: tuple[int, Image.Image] | None = None  # a row's rotations are asked back to back

    def image_for(item: MMBenchPass) -> Image.Image | None:
        nonlocal cache
        position = item.row.position
        if position in bad:
            return None
        source = data.image_source(position)
        if cache is not None and cache[0] == source:
            return cache[1]
        bad_source = next((p for p in bad if data.image_source(p) == source), None)
        if bad_source is not None:
            mark_bad(position, f"its image (from index {data.rows[source].index}) cannot be "
                               "decoded")
            return None
        try:
            image = data.image(position)
        except MMBenchImageError as err:
            mark_bad(position, str(err).split(": ", 1)[-1])
            return None
        cache = (source, image)
        return image

    def ask(batch: list[tuple[MMBenchPass, Image.Image]]) -> None:
        nonlocal done
        answers = answer_batch([(item.messages(), [image]) for item, image in batch])
        if len(answers) != len(batch):
            raise ValueError(f"the answer callable returned {len(answers)} answers "
                             f"for {len(batch)} questions")
        for (item, _), text in zip(batch, answers, strict=True):
            predictions.append(MMBenchPrediction(
                index=item.index, group=item.group, prediction=text,
                letter=extract_letter(text, item.options), answer=item.answer))
            if writer is not None:
                writer.write(item, text)

    reported = -1

    def report() -> None:
        nonlocal reported
        if writer is not None:
            writer.flush()
        if on_progress is not None and done != reported:
            on_progress(done, len(passes))
            reported = done

    predictions_file = None
    try:
        batch: list[tuple[MMBenchPass, Image.Image]] = []
        for item in passes:
            image = image_for(item)
            if image is None:
                done += 1
                continue
            batch.append((item, image))
            if len(batch) == batch_size:
                ask(batch)
                done += len(batch)
                batch = []
                report()
        if batch:
            ask(batch)
            done += len(batch)
        report()
        if writer is not None:
            predictions_file = writer.finish()
    finally:
        if writer is not None:
            writer.close()

    main_rows: dict[int, MMBenchRow] = {}
    for row in data.rows:
        if row.group not in main_rows or row.index < CIRCULAR_OFFSET:
            main_rows[row.group] = row
    skipped_groups = {data.rows[p].group for p in bad}
    overall, category, l2, n_questions, unscored = score_predictions(
        predictions, main_rows, skipped_groups)
    plain, plain_category = overall, category
    if circular:  # the first pass of each question is the plain evaluation's only one
        plain, plain_category, *_ = score_predictions(
            [p for p in predictions if p.index < CIRCULAR_OFFSET], main_rows, skipped_groups)
    result = MMBenchResult(
        tsv=tsv, circular=circular, circular_source=circular_source, overall=overall,
        category=category, l2_category=l2, n_questions=n_questions, n_unscored=unscored,
        n_rows=len(positions), n_unused_copies=unused,
        skipped=[SkippedRow(data.rows[p].index, data.rows[p].line, r) for p, r in bad.items()],
        skipped_questions=len(skipped_groups), predictions=predictions,
        plain=plain, plain_category=plain_category,
        predictions_file=predictions_file,
        summary_file=None if paths is None else paths["summary"])
    if paths is not None:
        write_text_atomic(paths["summary"],
                          json.dumps(result.summary(), indent=2, ensure_ascii=False) + "\n")
    return result
