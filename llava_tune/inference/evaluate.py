"""Exact-match evaluation: greedy answers to every user turn that has a reference answer."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llava_tune.assembly.model import ModelBundle
from llava_tune.constants import IMAGE_TOKEN
from llava_tune.data.formats import read_conversations
from llava_tune.data.image import load_image
from llava_tune.data.template import Message
from llava_tune.data.video import load_video
from llava_tune.errors import UserError
from llava_tune.inference.generate import (
    GenerationSettings,
    generate_batch,
    normalize_answer,
    strip_image_markers,
)


@dataclass
class EvalItem:
    record_id: str
    images: list[str]
    """The images of the `<image>` markers in `messages`, in order (a later turn's image is
    not one of an earlier turn's)."""
    messages: list[Message]
    """The conversation up to and including the question."""
    answer: str
    turn: int = 1
    """Which answer of its conversation this is (1 = the first): a follow-up is turn 2."""
    kinds: list[str] = field(default_factory=list)
    """"image" or "video", for each of `images`."""


@dataclass
class EvalSummary:
    correct: int = 0
    total: int = 0
    by_question: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    """question -> [correct, total]"""
    by_turn: dict[int, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    """turn of the conversation (1 = first answer) -> [correct, total]"""

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def add(self, question: str, hit: bool, turn: int = 1) -> None:
        self.correct += hit
        self.total += 1
        for counts in (self.by_question[question], self.by_turn[turn]):
            counts[0] += hit
            counts[1] += 1

    def as_dict(self, max_questions: int = 10) -> dict:
        """accuracy, correct, total; by_question when there are few distinct questions and
        by_turn (keys "1", "2", ...) when some conversations have several answers."""
        out = {"accuracy": self.accuracy, "correct": self.correct, "total": self.total}
        if len(self.by_question) <= max_questions:
            out["by_question"] = {q: {"accuracy": c / n, "total": n}
                                  for q, (c, n) in self.by_question.items()}
        if len(self.by_turn) > 1:
            out["by_turn"] = {str(t): {"accuracy": c / n, "total": n}
                              for t, (c, n) in sorted(self.by_turn.items())}
        return out


def eval_items(records: list[dict]) -> Iterator[EvalItem]:
    """An item for every assistant turn that follows a user turn, with the history before it
    (the reference answers of earlier turns, so each turn is scored on its own) and the
    images of the markers in it."""
    for record in records:
        messages = record["messages"]
        turn = 0
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                turn += 1
                if i > 0:
                    markers = sum(m["content"].count(IMAGE_TOKEN) for m in messages[:i])
                    yield EvalItem(record["id"], record["images"][:markers], messages[:i],
                                   message["content"], turn,
                                   record.get("kinds", ["image"] * markers)[:markers])


def load_visual(path: Path, kind: str, bundle: ModelBundle):
    """An image, or a video's frames as many as the model reads (data.video_frames)."""
    if kind == "video":
        return load_video(path, bundle.model.layout.video_frames)
    return load_image(path)


def check_output(path: str | os.PathLike | None, what: str) -> None:
    """Refuse an output path that cannot be written, before any answer is computed."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; give a file name")
    if not path.parent.exists():
        raise UserError(f"{what} {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"{what} {path}: folder {path.parent} is not writable")


def evaluate(bundle: ModelBundle, data: str | os.PathLike, image_folder: str | os.PathLike | None,
             settings: GenerationSettings, batch_size: int = 8, out: str | os.PathLike | None = None,
             on_progress: Callable[[int, int], None] = lambda done, total: None,
             on_skip: Callable[[str], None] = lambda message: None) -> EvalSummary:
    """Greedy answers to every question of `data` with a reference answer, and normalized
    exact-match accuracy (overall and per question).

    Predictions go to `out` (JSONL: id, turn, question, prediction, answer, correct) as they are
    produced, into `out.partial`, renamed to `out` at the end, so an interruption keeps what
    was done. Records that cannot be read are skipped through `on_skip`.
    """
    check_output(out, "--out")
    result = read_conversations(data)
    for problem in result.problems:
        on_skip(str(problem))
    items = list(eval_items(result.records))
    if not items:
        raise UserError(f"{data} has no user turn with an answer to evaluate")
    if any(item.images for item in items):
        if bundle.model.vision is None:
            raise UserError(f"{data} has images but the model is text-only")
        if image_folder is None:
            raise UserError(f"{data} has images; pass --image-folder")
    folder = Path(image_folder) if image_folder is not None else None
    summary = EvalSummary()
    partial = Path(f"{out}.partial") if out is not None else None
    sink = open(partial, "w", encoding="utf-8") if partial is not None else None
    try:
        for start in range(0, len(items), batch_size):
            chunk, conversations = [], []
            for item in items[start:start + batch_size]:
                try:
                    visuals = [load_visual(folder / name, kind, bundle)
                               for name, kind in zip(item.images, item.kinds, strict=True)]
                except UserError as err:  # one unreadable image or video: that question only
                    on_skip(f"{data} id {item.record_id!r} (answer {item.turn}): {err}")
                    continue
                chunk.append(item)
                conversations.append((item.messages, visuals))
            answers = generate_batch(bundle, conversations, settings) if chunk else []
            for item, prediction in zip(chunk, answers, strict=True):
                question = strip_image_markers(item.messages[-1]["content"])
                hit = normalize_answer(prediction) == normalize_answer(item.answer)
                summary.add(question, hit, item.turn)
                if sink is not None:
                    sink.write(json.dumps({"id": item.record_id, "turn": item.turn,
                                           "question": question,
                                           "prediction": prediction, "answer": item.answer,
                                           "correct": hit}, ensure_ascii=False) + "\n")
            if sink is not None:
                sink.flush()
            on_progress(min(start + batch_size, len(items)), len(items))
    finally:
        if sink is not None:
            sink.close()
    if partial is not None:
        os.replace(partial, out)
    return summary
