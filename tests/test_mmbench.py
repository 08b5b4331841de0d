"""MMBench-format evaluation (llava_tune/inference/mmbench/) and the shapes MMBench data
(llava_tune/demo/mmbench.py), with fake answer callables instead of a model.

(Over 400 lines: the TSV reader, answer extraction, CircularEval and the demo's MMBench data
share fixtures.)
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from llava_tune.demo import mmbench as sm
from llava_tune.demo import shapes
from llava_tune.errors import UserError
from llava_tune.inference import mmbench as mb

N_IMAGES = 30  # 60 questions
SIZE = 32
OFFSET = 1_000_000


def write_tsv(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    columns = columns or list(sm.TSV_COLUMNS)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns])
    return path


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return sm.shapes_tsv_rows(N_IMAGES, seed=0, image_size=SIZE)


@pytest.fixture
def tsv(tmp_path, rows) -> Path:
    return write_tsv(tmp_path / "shapes.tsv", rows)


@pytest.fixture
def circular_tsv(tmp_path) -> Path:
    return sm.write_shapes_tsv(tmp_path / "shapes_circ.tsv", N_IMAGES, seed=0, image_size=SIZE,
                               circular_copies=True)


def truth(rows: list[dict[str, str]]) -> dict[bytes, dict[str, str]]:
    """Image pixels -> {"color": ..., "shape": ...}, read from the rows' answers."""
    table: dict[bytes, dict[str, str]] = {}
    for row in rows:
        if int(row["index"]) >= OFFSET:
            continue
        pixels = Image.open(io.BytesIO(base64.b64decode(row["image"]))).convert("RGB").tobytes()
        table.setdefault(pixels, {})[row["category"]] = row[row["answer"]]
    return table


def options_in(prompt: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z])\. (.*)$", prompt, flags=re.MULTILINE))


def oracle(rows, wrong_on=lambda prompt, pixels: False):
    """An answer callable that sees the image and answers right, except where `wrong_on`."""
    table = truth(rows)

    def answer(messages, images):
        assert len(messages) == 1 and messages[0]["role"] == "user" and len(images) == 1
        prompt = messages[0]["content"]
        kind = "color" if shapes.COLOR_QUESTION in prompt else "shape"
        right = table[images[0].tobytes()][kind]
        options = options_in(prompt)
        letter = next(k for k, v in options.items() if v == right)
        if wrong_on(prompt, images[0].tobytes()):
            return next(k for k in options if k != letter)
        return f"The answer is {letter}."

    return answer


def never(messages, images):
    raise AssertionError("the model was asked although the input is bad")


# --------------------------------------------------------------------------- the TSV


def test_shapes_tsv_round_trip(tmp_path, rows):
    path = sm.write_shapes_tsv(tmp_path / "s.tsv", N_IMAGES, seed=0, image_size=SIZE)
    data = mb.MMBenchTSV.read(path)
    assert data.columns == list(sm.TSV_COLUMNS) and len(data) == 2 * N_IMAGES
    assert not data.bad and not data.has_circular_copies
    # Reference: pandas reads the same values.
    frame = pd.read_csv(path, sep="\t", keep_default_na=False, dtype=str)
    assert list(frame.columns) == list(sm.TSV_COLUMNS)
    for row, (_, ref), written in zip(data.rows, frame.iterrows(), rows, strict=True):
        assert row.fields == {c: ref[c] for c in sm.TSV_COLUMNS if c != "image"}
        assert row.fields == {c: written[c] for c in sm.TSV_COLUMNS if c != "image"}
        assert row.index == int(ref["index"]) and row.hint == (ref["hint"] or None)
        assert row.options == {k: ref[k] for k in "ABCD"} and row.answer == ref["answer"]
        assert row.category == ref["category"] and row.l2_category == "coarse_perception"
    for position in (0, 1, 2 * N_IMAGES - 1):
        image = data.image(position)
        assert image.mode == "RGB" and image.size == (SIZE, SIZE)
        expected = Image.open(io.BytesIO(base64.b64decode(frame["image"][position])))
        assert np.array_equal(np.asarray(image), np.asarray(expected.convert("RGB")))
    # The color question's right option is the one color drawn besides white.
    row = data.rows[0]
    colors = {tuple(c) for c in np.unique(np.asarray(data.image(0)).reshape(-1, 3), axis=0)}
    assert colors == {(255, 255, 255), shapes.COLORS[row.options[row.answer]]}


def test_shapes_tsv_contents(rows):
    color_rows = [r for r in rows if r["category"] == "color"]
    shape_rows = [r for r in rows if r["category"] == "shape"]
    assert len(color_rows) == len(shape_rows) == N_IMAGES
    for r in color_rows:
        assert r["question"] == "What color is the shape?"
        assert len({r[k] for k in "ABCD"}) == 4 and {r[k] for k in "ABCD"} <= set(shapes.COLORS)
    for r in shape_rows:
        assert r["question"] == "What shape is this?"
        assert sorted(r[k] for k in "ABCD") == sorted(shapes.SHAPES)
    # Answers spread over the letters (a model cannot score by always picking one).
    assert {r["answer"] for r in rows} == set("ABCD")
    assert sm.shapes_tsv_rows(N_IMAGES, seed=0, image_size=SIZE) == rows


def test_circular_copies_in_file_refer_to_original_images(circular_tsv):
    data = mb.MMBenchTSV.read(circular_tsv)
    assert len(data) == 4 * 2 * N_IMAGES and data.has_circular_copies and not data.bad
    by_index = {row.index: row for row in data.rows}
    copy = by_index[1 * OFFSET + 5]
    original = by_index[5]
    assert copy.group == 5 and copy.fields["index"] == str(OFFSET + 5)
    assert data.image_source(copy.position) == original.position
    assert np.array_equal(np.asarray(data.image(copy.position)),
                          np.asarray(data.image(original.position)))
    # Copy k holds the options moved k places up, the answer moving with them.
    for k in (1, 2, 3):
        row = by_index[k * OFFSET + 5]
        letters = "ABCD"
        for j, letter in enumerate(letters):
            assert row.options[letter] == original.options[letters[(j + k) % 4]]
        assert row.options[row.answer] == original.options[original.answer]


# --------------------------------------------------------------------------- prompts


def test_prompt_without_hint_is_xtuners_layout():
    messages = mb.build_messages("What color is the shape?",
                                 {"A": "red", "B": "blue", "C": "green", "D": "yellow"})
    assert messages == [{"role": "user", "content": (
        "<image>\nWhat color is the shape?\nA. red\nB. blue\nC. green\nD. yellow\n"
        "Answer with the option's letter from the given choices directly.")}]


def test_prompt_with_hint_is_xtuners_layout():
    messages = mb.build_messages("Which one is bigger?", {"A": "the cat", "B": "the dog"},
                                 hint="Look at the two animals.")
    assert messages[0]["content"] == (
        "<image>\nLook at the two animals.\nWhich one is bigger?\nA. the cat\nB. the dog\n"
        "Answer with the option's letter from the given choices directly.")


def test_prompt_chinese_instruction():
    text = mb.build_prompt("图中是什么颜色？", {"A": "红色", "B": "蓝色"})
    assert text == "图中是什么颜色？\nA. 红色\nB. 蓝色\n请直接回答选项字母。"


def test_prompts_from_a_tsv_with_hints_and_two_options(tmp_path, rows):
    base = rows[0]
    table = [
        {**base, "index": "0", "hint": "The picture is small.", "C": "", "D": "", "answer": "A",
         "A": base[base["answer"]], "B": "none of these"},
        {**base, "index": "1", "hint": ""},
    ]
    path = write_tsv(tmp_path / "h.tsv", table)
    prompts = []

    def record(messages, images):
        prompts.append(messages[0]["content"])
        return "A"

    mb.evaluate_mmbench(path, record)
    assert prompts[0] == (
        f"<image>\nThe picture is small.\nWhat color is the shape?\nA. {base[base['answer']]}\n"
        "B. none of these\nAnswer with the option's letter from the given choices directly.")
    assert prompts[1].startswith("<image>\nWhat color is the shape?\nA. ")


def test_training_records_use_the_evaluation_prompt(shapes_data):
    captions = json.loads((shapes_data / "pretrain.json").read_text())
    items = sm.items_from_captions(captions)
    assert len(items) == len(captions) and items[0][0] == captions[0]["image"]
    records = sm.mcq_records(items, seed=0)
    assert len(records) == 2 * len(items)
    for record, (image, color, _) in zip(records[::2], items, strict=True):
        human, gpt = (turn["value"] for turn in record["conversations"])
        options = options_in(human)
        assert record["image"] == image
        hint = human.split("\n")[1] if human.split("\n")[1] in sm.HINTS else None
        assert human == mb.build_messages(shapes.COLOR_QUESTION, options, hint)[0]["content"]
        assert options[gpt] == color and color in options.values()
        assert mb.extract_letter(gpt, options) == gpt
    shape_record = records[1]
    human, gpt = (turn["value"] for turn in shape_record["conversations"])
    assert options_in(human)[gpt] == items[0][2]
    assert {turn["value"] for r in records for turn in r["conversations"][1:]} <= set("ABCD")
    with_text = sm.mcq_records(items[:1], seed=0, with_text=True)
    letter, text = with_text[0]["conversations"][1]["value"].split(". ")
    assert text == items[0][1]
    assert mb.extract_letter(f"{letter}. {text}", options_in(
        with_text[0]["conversations"][0]["value"])) == letter
    assert sm.mcq_records(items[:1], seed=0, answer="letter_text") == with_text
    # The option's text alone: the letter it reads as is the right one.
    texts = sm.mcq_records(items, seed=0, answer="text")
    for record, lettered in zip(texts, records, strict=True):
        human, gpt = (turn["value"] for turn in record["conversations"])
        assert human == lettered["conversations"][0]["value"]
        assert mb.extract_letter(gpt, options_in(human)) == lettered["conversations"][1]["value"]
        assert gpt in set(shapes.COLORS) | set(shapes.SHAPES)
    with pytest.raises(ValueError, match="answer must be one of"):
        sm.mcq_records(items, answer="B")


def test_demo_finetune_data_gets_lettered_questions(tmp_path, shapes_data):
    for name in ("pretrain.json", "finetune.json"):
        (tmp_path / name).write_text((shapes_data / name).read_text())
    original = json.loads((shapes_data / "finetune.json").read_text())
    items = sm.items_from_captions(json.loads((shapes_data / "pretrain.json").read_text()))
    assert sm.add_mcq_to_finetune(tmp_path, 0.25, seed=3) == 32  # 2 questions x 16 of 64 images
    records = json.loads((tmp_path / "finetune.json").read_text())
    assert records[:len(original)] == original  # the SHAPES.md questions stay as they were
    assert records[len(original):] == sm.mcq_records(items[:16], seed=3)
    with pytest.raises(ValueError, match="fraction"):
        sm.add_mcq_to_finetune(tmp_path, 1.5)


def test_demo_inputs_hold_lettered_questions_and_a_heldout_tsv(tmp_path):
    from llava_tune.demo import make

    assert make.main([str(tmp_path), "--train", "8", "--heldout", "3", "--mcq", "0.5"]) == 0
    records = json.loads((tmp_path / "shapes" / "finetune.json").read_text())
    # One two-turn conversation per image (make.MULTI_TURN), then the lettered questions.
    assert len(records) == 8 + 2 * 4
    assert all(len(r["conversations"]) == 4 for r in records[:8])
    lettered = records[8:]
    assert [r["image"] for r in lettered] == [f"train/{i:06d}.png" for i in range(4)
                                              for _ in range(2)]
    # Answered with the option's text (make.MCQ_ANSWER), which reads as one option's letter.
    captions = json.loads((tmp_path / "shapes" / "pretrain.json").read_text())
    items = sm.items_from_captions(captions)[:4]
    assert lettered == sm.mcq_records(items, seed=0, answer="text")
    for record in lettered:
        human, gpt = (turn["value"] for turn in record["conversations"])
        assert mb.extract_letter(gpt, options_in(human)) is not None
    data = mb.MMBenchTSV.read(tmp_path / "shapes" / "heldout_mmbench.tsv")
    assert len(data) == 6 and not data.bad and not data.has_circular_copies
    assert [row.category for row in data.rows] == ["color", "shape"] * 3
    # New images: none of them is a training or held-out image of the demo.
    demo_pixels = {Image.open(p).convert("RGB").tobytes()
                   for p in (tmp_path / "shapes" / "images").rglob("*.png")}
    assert not {data.image(i).tobytes() for i in range(6)} & demo_pixels


def test_demo_lettered_questions_carry_hints_on_about_half(tmp_path):
    """As MMBench's rows do: a context sentence before the question on about half of them,
    in training and in the held-out TSV; never the answer, and the prompt is build_prompt's."""
    items = [(f"train/{i:06d}.png", color, shape) for i, (color, shape) in
             enumerate(zip(list(shapes.COLORS) * 40, list(shapes.SHAPES) * 60, strict=False))]
    records = sm.mcq_records(items, seed=0, answer="text")
    hinted = [r for r in records if r["conversations"][0]["value"].split("\n")[1] in sm.HINTS]
    assert 0.4 < len(hinted) / len(records) < 0.6
    for record in hinted:
        human = record["conversations"][0]["value"]
        hint, question = human.split("\n")[1:3]
        assert human == mb.build_messages(question, options_in(human), hint)[0]["content"]
    rows = sm.shapes_tsv_rows(100, seed=0)
    with_hint = [row for row in rows if row["hint"]]
    assert 0.4 < len(with_hint) / len(rows) < 0.6 and {r["hint"] for r in with_hint} <= set(sm.HINTS)
    words = set(shapes.COLORS) | set(shapes.SHAPES)
    assert not any(word in hint.lower().split() for hint in sm.HINTS for word in words)
    # The file carries them in MMBench's hint column.
    sm.write_shapes_tsv(tmp_path / "x.tsv", 10, seed=0)
    data = mb.MMBenchTSV.read(tmp_path / "x.tsv")
    assert [row.hint for row in data.rows] == [r["hint"] or None for r in rows[:20]]


# --------------------------------------------------------------------------- letters

COLORS4 = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}


@pytest.mark.parametrize("text, expected", [
    ("A", "A"), ("A.", "A"), ("(A)", "A"), ("b", "B"), ("  c.  ", "C"), ("**D**", "D"),
    ("[b]", "B"),
    ("A) blue", "A"),  # a stated label wins over the text after it
    ("B. blue", "B"), ("(c) green", "C"), ("d) yellow", "D"), ("B: blue", "B"),
    ("The answer is B", "B"), ("The answer is B.", "B"), ("Answer: C", "C"),
    ("answer: c", "C"), ("The correct option is (b).", "B"), ("Option D", "D"),
    ("The answer is B, not A.", "B"), ("answer is a.", "A"),
    ("the answer is a blue circle", "B"),  # "a" is the article
    ("blue", "B"), ("Blue.", "B"), ("It is blue.", "B"), ("A blue star.", "B"),
    ("It is B.", "B"), ("I think it is C.", "C"), ("B blue", "B"),
    ("", None), ("   ", None), ("purple", None), ("E", None), ("E. purple", None),
    ("A or B", None), ("The options are A and B", None), ("red or blue", None),
    ("Either B or C, blue.", None),
    ("I don't know", None), ("It is not clear.", None),
    ("The answer is B. Answer: C", None),
])
def test_extract_letter(text, expected):
    assert mb.extract_letter(text, COLORS4) == expected


def test_extract_letter_prefers_the_longer_option_text():
    options = {"A": "blue", "B": "light blue", "C": "red"}
    assert mb.extract_letter("It is light blue.", options) == "B"
    assert mb.extract_letter("blue", options) == "A"
    assert mb.extract_letter("same", {"A": "same", "B": "same"}) is None
    assert mb.extract_letter("It is a star.", dict(zip("ABCD", shapes.SHAPES, strict=True))) == "D"


def test_rotate_options():
    options = {"A": "r", "B": "b", "C": "g", "D": "y"}
    assert mb.rotate_options(options, "B", 0) == (options, "B")
    assert mb.rotate_options(options, "B", 1) == ({"A": "b", "B": "g", "C": "y", "D": "r"}, "A")
    assert mb.rotate_options(options, "A", 3) == ({"A": "y", "B": "r", "C": "b", "D": "g"}, "B")
    assert mb.rotate_options({"A": "x", "B": "y"}, None, 1) == ({"A": "y", "B": "x"}, None)


# --------------------------------------------------------------------------- scoring


def test_oracle_scores_one(tsv, rows):
    result = mb.evaluate_mmbench(tsv, oracle(rows))
    assert result.accuracy == 1.0 and result.overall == mb.Score(60, 60)
    assert result.category == {"color": mb.Score(30, 30), "shape": mb.Score(30, 30)}
    assert result.l2_category == {"coarse_perception": mb.Score(60, 60)}
    assert result.n_passes == 60 and result.n_no_letter == 0 and not result.skipped
    circular = mb.evaluate_mmbench(tsv, oracle(rows), circular=True)
    assert circular.accuracy == 1.0 and circular.n_passes == 4 * 60
    assert circular.circular_source == "generated"


def test_per_category_accuracy(tsv, rows):
    # Right on color; on shape always "A".
    table = truth(rows)

    def half(messages, images):
        prompt = messages[0]["content"]
        if shapes.SHAPE_QUESTION in prompt:
            return "A"
        right = table[images[0].tobytes()]["color"]
        return next(k for k, v in options_in(prompt).items() if v == right)

    shape_a = sum(r["answer"] == "A" for r in rows if r["category"] == "shape")
    result = mb.evaluate_mmbench(tsv, half)
    assert result.category == {"color": mb.Score(30, 30), "shape": mb.Score(shape_a, 30)}
    assert result.overall == mb.Score(30 + shape_a, 60)
    assert result.accuracy == pytest.approx((30 + shape_a) / 60)
    circular = mb.evaluate_mmbench(tsv, half, circular=True)
    assert circular.category == {"color": mb.Score(30, 30), "shape": mb.Score(0, 30)}


def test_always_a(tsv, rows):
    always_a = lambda messages, images: "A"  # noqa: E731
    n_a = sum(r["answer"] == "A" for r in rows)
    plain = mb.evaluate_mmbench(tsv, always_a)
    assert plain.overall == mb.Score(n_a, 60)
    assert 0.1 < plain.accuracy < 0.4  # about 1/4
    assert mb.evaluate_mmbench(tsv, always_a, circular=True).accuracy == 0.0


def test_circular_generated_rotations(tsv, rows, tmp_path):
    # Wrong in one rotation of question 5 only: that question, and only it, fails.
    result = mb.evaluate_mmbench(tsv, oracle(rows, wrong_on=rotation_of(rows[5], 2)),
                                 circular=True, out_dir=tmp_path / "out")
    assert result.overall == mb.Score(59, 60)
    assert result.category["shape"] == mb.Score(29, 30)  # index 5 is a shape question
    indexes = [p.index for p in result.predictions]
    assert sorted(indexes) == sorted(i + k * OFFSET for i in range(60) for k in range(4))
    assert [p.hit for p in result.predictions if p.group == 5] == [True, True, False, True]
    # The predictions file holds the rotated options and answers.
    frame = pd.read_csv(result.predictions_file, sep="\t", keep_default_na=False, dtype=str)
    row = frame[frame["index"] == str(2 * OFFSET + 5)].iloc[0]
    original = rows[5]
    for j, letter in enumerate("ABCD"):
        assert row[letter] == original["ABCD"[(j + 2) % 4]]
    assert row[row["answer"]] == original[original["answer"]]
    assert row["prediction"] != row["answer"]


def pixels_of(row: dict[str, str]) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(row["image"]))).convert("RGB").tobytes()


def rotation_of(row: dict[str, str], shift: int):
    """`wrong_on` for one rotation of one question (a prompt alone is not unique: the image
    tells questions with the same option order apart)."""
    rotated, _ = mb.rotate_options({k: row[k] for k in "ABCD"}, row["answer"], shift)
    prompt = mb.build_messages(row["question"], rotated, row["hint"] or None)[0]["content"]
    pixels = pixels_of(row)
    return lambda p, px: p == prompt and px == pixels


def test_circular_copies_in_the_file(circular_tsv, rows):
    all_rows = sm.shapes_tsv_rows(N_IMAGES, seed=0, image_size=SIZE, circular_copies=True)
    copy = next(r for r in all_rows if r["index"] == str(3 * OFFSET + 8))
    copy_prompt = mb.build_messages(copy["question"], {k: copy[k] for k in "ABCD"},
                                    copy["hint"] or None)[0]["content"]
    wrong = lambda p, px: p == copy_prompt and px == pixels_of(rows[8])  # noqa: E731
    result = mb.evaluate_mmbench(circular_tsv, oracle(rows, wrong), circular=True)
    assert result.circular_source == "file" and result.n_passes == 4 * 60
    assert sorted(p.index for p in result.predictions) == sorted(int(r["index"]) for r in all_rows)
    assert result.overall == mb.Score(59, 60) and result.n_questions == 60
    assert [p.hit for p in result.predictions if p.group == 8].count(False) == 1
    # Not circular: only the originals are asked; the copies are counted as unused.
    plain = mb.evaluate_mmbench(circular_tsv, oracle(rows), circular=False)
    assert plain.n_passes == 60 and plain.n_unused_copies == 180 and plain.accuracy == 1.0
    assert all(p.index < OFFSET for p in plain.predictions)
    always_a = mb.evaluate_mmbench(circular_tsv, lambda m, i: "A", circular=True)
    assert always_a.accuracy == 0.0


def test_circular_run_reports_the_plain_score_too(tsv, circular_tsv, rows, tmp_path):
    # Wrong whenever yellow is option C: some questions fail in some rotations only.
    answerer = oracle(rows, wrong_on=lambda p, px: "C. yellow" in p)
    for path in (tsv, circular_tsv):
        plain = mb.evaluate_mmbench(path, answerer)
        circular = mb.evaluate_mmbench(path, answerer, circular=True, out_dir=tmp_path / "o")
        assert plain.plain == plain.overall and plain.plain_category == plain.category
        assert circular.plain == plain.overall and circular.plain_category == plain.category
        assert circular.overall.correct < circular.plain.correct < 60
        summary = json.loads(circular.summary_file.read_text())
        assert summary["plain"] == {**plain.overall.as_dict(), "category": {
            name: score.as_dict() for name, score in plain.category.items()}}
        assert summary["overall"] == circular.accuracy


def test_test_split_without_answers(tmp_path, rows):
    columns = [c for c in sm.TSV_COLUMNS if c != "answer"]
    path = write_tsv(tmp_path / "test.tsv", rows, columns)
    result = mb.evaluate_mmbench(path, lambda m, i: "B", circular=True, out_dir=tmp_path / "o")
    assert result.overall is None and result.accuracy is None and result.category == {}
    assert result.n_unscored == 60 and result.n_passes == 240
    summary = json.loads(result.summary_file.read_text())
    assert summary["overall"] is None and summary["unscored_questions"] == 60
    header = result.predictions_file.read_text().splitlines()[0].split("\t")
    assert header == columns[:-1] + ["prediction"]


def test_batched_answers_match_single(tsv, rows):
    single = oracle(rows, wrong_on=lambda p, px: "C. yellow" in p)
    sizes = []

    def batch_answer(batch):
        sizes.append(len(batch))
        return [single(messages, images) for messages, images in batch]

    progress = []
    batched = mb.evaluate_mmbench_batched(tsv, batch_answer, circular=True, batch_size=7,
                                          on_progress=lambda d, t: progress.append((d, t)))
    one = mb.evaluate_mmbench(tsv, single, circular=True)
    assert batched.predictions == one.predictions and batched.overall == one.overall
    assert max(sizes) == 7 and sum(sizes) == 240
    assert progress == [(min(7 * k, 240), 240) for k in range(1, 36)]
    with pytest.raises(ValueError, match="returned 0 answers for 7 questions"):
        mb.evaluate_mmbench_batched(tsv, lambda batch: [], batch_size=7)


# --------------------------------------------------------------------------- output files


def test_predictions_file_layout(tsv, rows, tmp_path):
    odd = "first line\tsecond\n\"quoted\""

    def answer(messages, images):
        return odd if shapes.SHAPE_QUESTION in messages[0]["content"] else "B"

    out = tmp_path / "out"
    result = mb.evaluate_mmbench(tsv, answer, out_dir=out)
    assert result.predictions_file == out / "shapes_predictions.tsv"
    assert result.summary_file == out / "shapes_summary.json"
    assert sorted(p.name for p in out.iterdir()) == ["shapes_predictions.tsv",
                                                     "shapes_summary.json"]
    frame = pd.read_csv(result.predictions_file, sep="\t", keep_default_na=False, dtype=str)
    assert list(frame.columns) == [c for c in sm.TSV_COLUMNS if c != "image"] + ["prediction"]
    assert len(frame) == 60
    for (_, got), row in zip(frame.iterrows(), rows, strict=True):
        assert all(got[c] == row[c] for c in sm.TSV_COLUMNS if c != "image")
        assert got["prediction"] == (odd if row["category"] == "shape" else "B")
    summary = json.loads(result.summary_file.read_text())
    n_b = sum(r["answer"] == "B" for r in rows if r["category"] == "color")
    assert summary["overall"] == pytest.approx(n_b / 60)
    assert summary["category"]["color"] == {"accuracy": pytest.approx(n_b / 30),
                                            "correct": n_b, "total": 30}
    assert summary["category"]["shape"]["correct"] == 0
    assert summary["passes_without_letter"] == 30  # the odd answer names no option
    assert summary["circular"] is False and summary["skipped_rows"] == []
    assert summary["predictions_file"] == str(result.predictions_file)


def test_interruption_keeps_the_partial_predictions(tsv, rows, tmp_path):
    calls = []

    def flaky(messages, images):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return "A"

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        mb.evaluate_mmbench(tsv, flaky, out_dir=out)
    paths = mb.output_paths(tsv, out)
    assert not paths["predictions"].exists() and not paths["summary"].exists()
    frame = pd.read_csv(paths["partial"], sep="\t", keep_default_na=False, dtype=str)
    assert list(frame["index"]) == ["0", "1", "2", "3", "4"]
    # A complete run afterwards replaces it.
    mb.evaluate_mmbench(tsv, lambda m, i: "A", out_dir=out)
    assert paths["predictions"].exists() and not paths["partial"].exists()


# --------------------------------------------------------------------------- bad input


def test_missing_columns(tmp_path, rows):
    path = write_tsv(tmp_path / "bad.tsv", rows, ["index", "question", "A", "B", "C"])
    with pytest.raises(UserError) as err:
        mb.evaluate_mmbench(path, never)
    message = str(err.value)
    assert str(path) in message and "image" in message
    assert "column(s) image missing" in message
    assert "index question hint A B C D answer category l2-category image" in message


@pytest.mark.parametrize("problem, match", [
    ("missing", "not found"), ("folder", "is a folder"), ("empty", "is empty")])
def test_unreadable_tsv(tmp_path, problem, match):
    path = tmp_path / "x.tsv"
    if problem == "folder":
        path.mkdir()
    elif problem == "empty":
        path.write_text("")
    with pytest.raises(UserError, match=match):
        mb.evaluate_mmbench(path, never)


def test_bad_row_values(tmp_path, rows):
    bad_answer = [dict(rows[0], answer="E")]
    with pytest.raises(UserError, match=r"line 2 \(index 0\): answer 'E' is not one of"):
        mb.MMBenchTSV.read(write_tsv(tmp_path / "a.tsv", bad_answer))
    bad_index = [dict(rows[0], index="first")]
    with pytest.raises(UserError, match="line 2: index 'first' is not a non-negative integer"):
        mb.MMBenchTSV.read(write_tsv(tmp_path / "b.tsv", bad_index))
    twice = [rows[0], dict(rows[1], index="0")]
    with pytest.raises(UserError, match="line 3: index 0 also on line 2"):
        mb.MMBenchTSV.read(write_tsv(tmp_path / "c.tsv", twice))
    one_option = [dict(rows[0], B="", C="", D="", answer="A")]
    with pytest.raises(UserError, match="has 1 option"):
        mb.MMBenchTSV.read(write_tsv(tmp_path / "d.tsv", one_option))


def _truncated_png(row: dict[str, str]) -> str:
    raw = base64.b64decode(row["image"])
    return base64.b64encode(raw[: len(raw) // 2]).decode()


def test_broken_images_are_skipped_and_reported(tmp_path, rows):
    table = [dict(r) for r in rows]
    table[3]["image"] = "this is not base64!!" * 5  # found while reading
    table[10]["image"] = _truncated_png(table[10])  # valid header: found when decoded
    table[20]["image"] = "9999"  # refers to a row that does not exist
    table[21]["image"] = "3"  # refers to the broken row
    path = write_tsv(tmp_path / "broken.tsv", table)
    data = mb.MMBenchTSV.read(path)
    assert set(data.bad) == {3, 20, 21}
    with pytest.raises(mb.MMBenchImageError, match=r"index 10 \(line 12\): image cannot be"):
        data.image(10)
    asked = []

    def answer(messages, images):
        asked.append(messages[0]["content"])
        return oracle(rows)(messages, images)

    out = tmp_path / "out"
    result = mb.evaluate_mmbench(path, answer, out_dir=out, max_bad_fraction=0.1)
    assert [(s.index, s.line) for s in result.skipped] == [(3, 5), (20, 22), (21, 23), (10, 12)]
    assert "base64" in result.skipped[0].reason or "not an image" in result.skipped[0].reason
    assert "index 9999" in result.skipped[1].reason
    assert result.skipped_questions == 4 and len(asked) == 56
    assert result.overall == mb.Score(56, 56) and result.n_rows == 60
    summary = json.loads(result.summary_file.read_text())
    assert [s["index"] for s in summary["skipped_rows"]] == [3, 20, 21, 10]
    frame = pd.read_csv(result.predictions_file, sep="\t", keep_default_na=False, dtype=str)
    assert len(frame) == 56 and not {"3", "10", "20", "21"} & set(frame["index"])
    # Circular: the skipped rows' rotations are not asked either.
    circular = mb.evaluate_mmbench(path, oracle(rows), circular=True, max_bad_fraction=0.1)
    assert circular.n_passes == 4 * 56 and circular.overall == mb.Score(56, 56)


def test_too_many_broken_images_is_an_error(tmp_path, rows):
    table = [dict(r) for r in rows]
    for i in (1, 2, 3, 4):
        table[i]["image"] = "@@@@" * 20
    path = write_tsv(tmp_path / "broken.tsv", table)
    with pytest.raises(UserError) as err:  # 4 of 60 > 5 % (3 rows): before any answering
        mb.evaluate_mmbench(path, never)
    assert str(path) in str(err.value) and "4 of 60 rows" in str(err.value)
    assert "index 1 (line 3)" in str(err.value)
    # Found while decoding: the error comes when the limit is passed.
    table = [dict(r) for r in rows]
    for i in (30, 31, 32, 33):
        table[i]["image"] = _truncated_png(table[i])
    path = write_tsv(tmp_path / "truncated.tsv", table)
    asked = []
    with pytest.raises(UserError, match="4 of 60 rows"):
        mb.evaluate_mmbench(path, lambda m, i: asked.append(1) or "A")
    assert len(asked) == 30
    # One bad row is always tolerated, however small the file.
    small = write_tsv(tmp_path / "small.tsv", [dict(rows[0], image="@@@@" * 20), rows[1]])
    assert mb.evaluate_mmbench(small, lambda m, i: "A").n_passes == 1


def test_out_dir_problems_raise_before_answering(tsv, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        mb.evaluate_mmbench(tsv, never, out_dir=a_file)
    with pytest.raises(UserError, match="cannot create the output folder"):
        mb.evaluate_mmbench(tsv, never, out_dir=a_file / "sub")
    out = tmp_path / "out"
    (out / "shapes_predictions.tsv").mkdir(parents=True)
    with pytest.raises(UserError, match="shapes_predictions.tsv is a folder"):
        mb.evaluate_mmbench(tsv, never, out_dir=out)
    out2 = tmp_path / "out2"
    (out2 / "shapes_summary.json").mkdir(parents=True)
    with pytest.raises(UserError, match="shapes_summary.json is a folder"):
        mb.evaluate_mmbench(tsv, never, circular=True, out_dir=out2)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_out_dir_raises_before_answering(tsv, tmp_path):
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(UserError, match="not writable"):
            mb.evaluate_mmbench(tsv, never, out_dir=out)
    finally:
        out.chmod(0o700)


def test_unwritable_out_dir_check(tsv, tmp_path, monkeypatch):
    # The same check as above, where the tests run as root (root may write anywhere).
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match=r"output folder .*out is not writable"):
        mb.evaluate_mmbench(tsv, never, out_dir=tmp_path / "out")
