"""Asking every question (every rotation for CircularEval), scoring, and the output files."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from llava_tune.errors import UserError
from llava_tune.files import write_text_atomic
from llava_tune.inference.mmbench.answers import build_messages, extract_letter, rotate_options
from llava_tune.inference.mmbench.results import (
    MMBenchPrediction,
    MMBenchResult,
    PredictionWriter,
    SkippedRow,
    check_out_dir,
    score_predictions,
)
from llava_tune.inference.mmbench.tsv import (
    CIRCULAR_OFFSET,
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
    paths = check_out_dir(tsv, out_dir) if out_dir is not None else None
    data = MMBenchTSV.read(tsv)
    passes, circular_source, unused = plan_passes(data, circular)
    positions = list(dict.fromkeys(item.row.position for item in passes))
    images = _Images(tsv, data, positions, max_bad_fraction)
    writer = PredictionWriter(paths, data.columns) if paths is not None else None
    predictions: list[MMBenchPrediction] = []
    predictions_file = None
    reported = -1
    try:
        for done, batch in _batches(passes, images, batch_size):
            if batch:
                predictions += _ask(answer_batch, batch, writer)
            if writer is not None:
                writer.flush()
            if on_progress is not None and done != reported:
                on_progress(done, len(passes))
                reported = done
        if writer is not None:
            predictions_file = writer.finish()
    finally:
        if writer is not None:
            writer.close()
    return _result(tsv, data, circular, circular_source, unused, positions, images.bad,
                   predictions, predictions_file, paths)


class _Images:
    """Each pass's image, decoded once per source row (a row's rotations are asked back to
    back); rows whose image cannot be decoded are recorded in `bad`, and more than
    `max_bad_fraction` of the asked rows (at least one is always tolerated) raises."""

    def __init__(self, tsv: Path, data: MMBenchTSV, positions: list[int],
                 max_bad_fraction: float) -> None:
        self.tsv, self.data, self.positions = tsv, data, positions
        self.fraction = max_bad_fraction
        self.allowed = max(1, int(max_bad_fraction * len(positions)))
        self.bad: dict[int, str] = {}
        self._last: tuple[int, Image.Image] | None = None
        for position in positions:
            if position in data.bad:
                self.mark_bad(position, data.bad[position])

    def mark_bad(self, position: int, reason: str) -> None:
        self.bad[position] = reason
        if len(self.bad) > self.allowed:
            listed = "; ".join(f"{self.data.rows[p].where()}: {r}"
                               for p, r in list(self.bad.items())[:5])
            raise UserError(
                f"{self.tsv}: {len(self.bad)} of {len(self.positions)} rows have an image that "
                f"cannot be decoded (more than {self.fraction:.0%}), e.g. {listed}. The file is "
                "damaged or its image column is not base64-encoded images; get a fresh copy")

    def __call__(self, item: MMBenchPass) -> Image.Image | None:
        position = item.row.position
        if position in self.bad:
            return None
        source = self.data.image_source(position)
        if self._last is not None and self._last[0] == source:
            return self._last[1]
        if any(self.data.image_source(p) == source for p in self.bad):
            self.mark_bad(position, f"its image (from index {self.data.rows[source].index}) "
                                    "cannot be decoded")
            return None
        try:
            image = self.data.image(position)
        except MMBenchImageError as err:
            self.mark_bad(position, str(err).split(": ", 1)[-1])
            return None
        self._last = (source, image)
        return image


def _batches(passes: list[MMBenchPass], images: _Images, batch_size: int):
    """(passes done so far, a batch of (pass, image) to ask), a batch at most `batch_size`
    long; passes whose image is bad count as done without being asked."""
    batch: list[tuple[MMBenchPass, Image.Image]] = []
    done = 0
    for item in passes:
        image = images(item)
        if image is None:
            done += 1
            continue
        batch.append((item, image))
        if len(batch) == batch_size:
            done += len(batch)
            yield done, batch
            batch = []
    done += len(batch)
    yield done, batch


def _ask(answer_batch: BatchAnswerFn, batch: list[tuple[MMBenchPass, Image.Image]],
         writer: PredictionWriter | None) -> list[MMBenchPrediction]:
    answers = answer_batch([(item.messages(), [image]) for item, image in batch])
    if len(answers) != len(batch):
        raise ValueError(f"the answer callable returned {len(answers)} answers "
                         f"for {len(batch)} questions")
    out = []
    for (item, _), text in zip(batch, answers, strict=True):
        out.append(MMBenchPrediction(index=item.index, group=item.group, prediction=text,
                                     letter=extract_letter(text, item.options),
                                     answer=item.answer))
        if writer is not None:
            writer.write(item, text)
    return out


def _result(tsv: Path, data: MMBenchTSV, circular: bool, circular_source, unused: int,
            positions: list[int], bad: dict[int, str], predictions: list[MMBenchPrediction],
            predictions_file, paths) -> MMBenchResult:
    """Score the predictions against each question's original row; write the summary."""
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
