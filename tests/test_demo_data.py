"""Fast checks of the embedded demo's data generator and tokenizer (llava_tune/demo/).

(Over 400 lines: one file for the demo's generators, which share fixtures.)
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from llava_tune.demo import shapes
from llava_tune.demo import tokenizer as demo_tokenizer
from llava_tune.inference.generate import normalize_answer

WHITE = (255, 255, 255)


def _mask(image: Image.Image, color: str) -> np.ndarray:
    return np.all(np.asarray(image) == np.array(shapes.COLORS[color], dtype=np.uint8), axis=-1)


def _colors(image: Image.Image) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in np.unique(np.asarray(image).reshape(-1, 3), axis=0)}


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("shape", shapes.SHAPES)
@pytest.mark.parametrize("color", list(shapes.COLORS))
def test_draw_shape_size_background_and_exact_color(shape: str, color: str) -> None:
    image = shapes.draw_shape(shape, color, 50.3, (56.2, 55.7))
    assert image.mode == "RGB" and image.size == (112, 112)
    assert _colors(image) == {WHITE, shapes.COLORS[color]}
    pixels = np.asarray(image)
    for corner in (pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]):
        assert tuple(corner) == WHITE
    assert _mask(image, color).sum() > 0


def test_color_table_is_the_spec() -> None:
    assert shapes.COLORS == {
        "red": (220, 40, 40),
        "green": (40, 170, 60),
        "blue": (40, 80, 220),
        "yellow": (235, 200, 30),
        "purple": (140, 60, 170),
        "orange": (245, 130, 30),
    }
    assert shapes.SHAPES == ("circle", "square", "triangle", "star")


# Ten triangles of area R * r * sin(36 deg) / 2 with R = s/2, r = s/5: s^2 * sin(36 deg) / 2.
STAR_AREA = 0.5 * math.sin(math.pi / 5)


@pytest.mark.parametrize(
    ("shape", "area_per_s2"),
    [("square", 1.0), ("circle", math.pi / 4), ("triangle", 0.5), ("star", STAR_AREA)],
)
@pytest.mark.parametrize(
    ("size", "center"), [(80.0, (56.0, 56.0)), (61.7, (40.3, 70.9)), (89.6, (44.8, 67.2))]
)
def test_shape_areas(
    shape: str, area_per_s2: float, size: float, center: tuple[float, float]
) -> None:
    mask = _mask(shapes.draw_shape(shape, "blue", size, center), "blue")
    assert mask.sum() == pytest.approx(area_per_s2 * size * size, rel=0.04)


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_shape_lies_inside_its_box(shape: str) -> None:
    rng = random.Random(3)
    for _ in range(20):
        spec = shapes.sample_shape(rng)
        mask = _mask(shapes.draw_shape(shape, "red", spec["size"], spec["center"]), "red")
        ys, xs = np.nonzero(mask)
        cx, cy = spec["center"]
        half = spec["size"] / 2
        # Pixel centers (x + 0.5, y + 0.5) lie in the box.
        assert xs.min() + 0.5 >= cx - half - 1e-9 and xs.max() + 0.5 <= cx + half + 1e-9
        assert ys.min() + 0.5 >= cy - half - 1e-9 and ys.max() + 0.5 <= cy + half + 1e-9


def test_triangle_points_up_and_star_is_symmetric_with_a_point_up() -> None:
    tri = _mask(shapes.draw_shape("triangle", "red", 80, (56, 56)), "red")
    rows = tri.sum(axis=1)
    filled = np.nonzero(rows)[0]
    assert rows[filled[0]] < 5 and rows[filled[-1]] > 75  # apex on top, base at the bottom
    star = _mask(shapes.draw_shape("star", "red", 80, (56, 56)), "red")
    assert np.array_equal(star, star[:, ::-1])  # mirror symmetric about the vertical axis
    ys, xs = np.nonzero(star)
    assert ys.min() <= 56 - 40 + 2  # the top point reaches the outer radius
    assert set(xs[ys == ys.min()]) <= {54, 55, 56, 57}  # ... straight above the center
    assert ys.max() < 56 + 40 - 5  # the lower points do not reach the bottom of the box
    assert not star[56 - 15, 56 - 15]  # the notch between two points is empty


def test_sample_shape_ranges() -> None:
    rng = random.Random(0)
    samples = [shapes.sample_shape(rng, 112) for _ in range(2000)]
    assert {s["shape"] for s in samples} == set(shapes.SHAPES)
    assert {s["color"] for s in samples} == set(shapes.COLORS)
    for s in samples:
        assert set(s) == {"shape", "color", "size", "center"}
        assert 0.4 * 112 <= s["size"] <= 0.8 * 112
        cx, cy = s["center"]
        half = s["size"] / 2
        assert half <= cx <= 112 - half and half <= cy <= 112 - half
    sizes = np.array([s["size"] for s in samples])
    assert sizes.min() < 0.42 * 112 and sizes.max() > 0.78 * 112


def test_normalize_answer() -> None:
    assert normalize_answer("  It is Red. \n") == "it is red"
    assert normalize_answer("It is a circle") == "it is a circle"


# --------------------------------------------------------------------------- dataset files


def _load(out: Path, name: str) -> list[dict]:
    return json.loads((out / f"{name}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    summary = shapes.generate(out, n_train=24, n_heldout=10, seed=5, n_text=200)
    return out, summary


def test_generate_layout_and_summary(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    assert summary["records"] == {"pretrain": 24, "finetune": 48, "heldout": 20,
                                  "heldout_multiturn": 10, "text": 200}
    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == [
        f"{i:06d}.png" for i in range(24)
    ]
    assert sorted(p.name for p in (out / "images" / "heldout").iterdir()) == [
        f"{i:06d}.png" for i in range(10)
    ]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    for name in ("pretrain", "finetune", "heldout", "heldout_multiturn", "text"):
        assert Path(summary["files"][name]) == out / f"{name}.json"


def test_pretrain_records(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    records = _load(out, "pretrain")
    for index, record in enumerate(records):
        assert set(record) == {"id", "image", "conversations"}
        assert record["id"] == f"train-{index:06d}"
        assert record["image"] == f"train/{index:06d}.png"
        human, gpt = record["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n")
        assert human["value"][len("<image>\n") :] in shapes.CAPTION_INSTRUCTIONS
        match = re.fullmatch(r"A (\w+) (\w+)\.", gpt["value"])
        assert match and match[1] in shapes.COLORS and match[2] in shapes.SHAPES
        # The caption describes the image.
        image = Image.open(out / "images" / record["image"])
        assert image.size == (112, 112)
        assert _colors(image) == {WHITE, shapes.COLORS[match[1]]}


def test_finetune_records(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    records = _load(out, "finetune")
    captions = {r["image"]: r["conversations"][1]["value"] for r in _load(out, "pretrain")}
    color_qs = {shapes.COLOR_QUESTION, *shapes.COLOR_PARAPHRASES}
    shape_qs = {shapes.SHAPE_QUESTION, *shapes.SHAPE_PARAPHRASES}
    for index in range(24):
        color_rec, shape_rec = records[2 * index], records[2 * index + 1]
        assert color_rec["id"] == f"train-{index:06d}-color"
        assert shape_rec["id"] == f"train-{index:06d}-shape"
        _, color, shape = captions[f"train/{index:06d}.png"][:-1].split(" ")
        for record, questions, answer in (
            (color_rec, color_qs, f"It is {color}."),
            (shape_rec, shape_qs, f"It is a {shape}."),
        ):
            assert set(record) == {"id", "image", "conversations"}
            assert record["image"] == f"train/{index:06d}.png"
            assert len(record["conversations"]) == 2
            human, gpt = record["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].startswith("<image>\n")
            assert human["value"][len("<image>\n") :] in questions
            assert gpt["value"] == answer


def test_heldout_records_use_the_exact_questions(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    records = _load(out, "heldout")
    assert len(records) == 20
    for index in range(10):
        color_rec, shape_rec = records[2 * index], records[2 * index + 1]
        assert color_rec["id"] == f"heldout-{index:06d}-color"
        assert shape_rec["id"] == f"heldout-{index:06d}-shape"
        assert color_rec["image"] == shape_rec["image"] == f"heldout/{index:06d}.png"
        assert color_rec["conversations"][0] == {
            "from": "human",
            "value": "<image>\nWhat color is the shape?",
        }
        assert shape_rec["conversations"][0] == {
            "from": "human",
            "value": "<image>\nWhat shape is this?",
        }
        color = re.fullmatch(r"It is (\w+)\.", color_rec["conversations"][1]["value"])[1]
        shape = re.fullmatch(r"It is a (\w+)\.", shape_rec["conversations"][1]["value"])[1]
        assert color in shapes.COLORS and shape in shapes.SHAPES
        image = Image.open(out / "images" / color_rec["image"])
        assert _colors(image) == {WHITE, shapes.COLORS[color]}


def test_heldout_multiturn_asks_both_questions_in_turn(dataset: tuple[Path, dict]) -> None:
    """One conversation per held-out image: both exact questions, the image marker once, the
    follow-up alternating between color and shape; the answers are heldout.json's."""
    out, _ = dataset
    single = {r["id"]: r for r in _load(out, "heldout")}
    records = _load(out, "heldout_multiturn")
    assert len(records) == 10
    for index, record in enumerate(records):
        base = f"heldout-{index:06d}"
        assert record["id"] == f"{base}-both" and record["image"] == f"heldout/{index:06d}.png"
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
        assert turns[0]["value"].startswith("<image>\n") and "<image>" not in turns[2]["value"]
        kinds = ["shape", "color"] if index % 2 == 0 else ["color", "shape"]
        for (human, gpt), kind in zip((turns[:2], turns[2:]), kinds, strict=True):
            reference = single[f"{base}-{kind}"]["conversations"]
            assert human["value"].removeprefix("<image>\n") == reference[0]["value"].removeprefix("<image>\n")
            assert gpt == reference[1]


def test_multi_turn_training_records(tmp_path: Path, dataset: tuple[Path, dict]) -> None:
    """multi_turn=1: one two-turn record per training image holding the same two questions
    and answers as the single-turn records (either order); multi_turn=0 is the default."""
    out, _ = dataset
    shapes.generate(tmp_path, n_train=24, n_heldout=2, seed=5, n_text=10, multi_turn=1.0)
    single = _load(out, "finetune")
    records = _load(tmp_path, "finetune")
    assert len(records) == 24
    orders = set()
    for index, record in enumerate(records):
        assert record["id"] == f"train-{index:06d}-both"
        turns = record["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and "<image>" not in turns[2]["value"]
        pairs = {(t[0]["value"].removeprefix("<image>\n"), t[1]["value"])
                 for t in (turns[:2], turns[2:])}
        expected = {(r["conversations"][0]["value"].removeprefix("<image>\n"),
                     r["conversations"][1]["value"]) for r in single[2 * index:2 * index + 2]}
        assert pairs == expected
        orders.add(turns[1]["value"].startswith("It is a "))
    assert orders == {True, False}  # both orders occur
    with pytest.raises(ValueError, match="multi_turn"):
        shapes.generate(tmp_path / "bad", n_train=1, n_heldout=1, multi_turn=2)


def test_text_records(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    records = _load(out, "text")
    answers = {shapes.caption(c, s) for c in shapes.COLORS for s in shapes.SHAPES}
    answers |= {f"It is {c}." for c in shapes.COLORS} | {f"It is a {s}." for s in shapes.SHAPES}
    generic = 0
    for index, record in enumerate(records):
        assert set(record) == {"id", "conversations"}
        assert record["id"] == f"text-{index:06d}"
        turns = record["conversations"]
        assert len(turns) in (2, 4)
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(t["value"] and "<image>" not in t["value"] for t in turns)
        for gpt in turns[1::2]:
            if gpt["value"] in shapes.GENERIC_SENTENCES:
                generic += 1
            else:
                assert gpt["value"] in answers
    assert 1 <= generic <= len(shapes.GENERIC_SENTENCES)


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_generate_is_deterministic_and_independent_of_workers(
    tmp_path: Path, dataset: tuple[Path, dict]
) -> None:
    out, _ = dataset
    again = tmp_path / "again"
    shapes.generate(again, n_train=24, n_heldout=10, seed=5, n_text=200, workers=2)
    assert _snapshot(again) == _snapshot(out)
    other = tmp_path / "other"
    shapes.generate(other, n_train=24, n_heldout=10, seed=6, n_text=200)
    assert _load(other, "pretrain") != _load(out, "pretrain")


def test_heldout_does_not_depend_on_n_train(tmp_path: Path) -> None:
    small, large = tmp_path / "small", tmp_path / "large"
    shapes.generate(small, n_train=3, n_heldout=8, seed=1, n_text=10)
    shapes.generate(large, n_train=30, n_heldout=8, seed=1, n_text=10)
    assert _load(small, "heldout") == _load(large, "heldout")
    for i in range(8):
        name = f"images/heldout/{i:06d}.png"
        assert (small / name).read_bytes() == (large / name).read_bytes()
    # The first training samples do not depend on n_train either.
    assert _load(small, "pretrain") == _load(large, "pretrain")[:3]


def test_shapes_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        shapes.main(
            [
                str(tmp_path),
                "--train",
                "4",
                "--heldout",
                "2",
                "--seed",
                "3",
                "--image-size",
                "64",
                "--text",
                "30",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == {"pretrain": 4, "finetune": 8, "heldout": 4,
                                  "heldout_multiturn": 2, "text": 30}
    assert Image.open(tmp_path / "images" / "train" / "000000.png").size == (64, 64)


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(dataset: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out, _ = dataset
    files = [str(out / f"{name}.json") for name in ("text", "pretrain", "finetune")]
    tok = tmp_path_factory.mktemp("tok")
    assert (
        demo_tokenizer.main(["--text-json", *files, "--out", str(tok), "--vocab-size", "512"]) == 0
    )
    return tok


@pytest.fixture(scope="module")
def sp(tokenizer_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))


def test_tokenizer_files_and_config(tokenizer_dir: Path, sp: spm.SentencePieceProcessor) -> None:
    assert {p.name for p in tokenizer_dir.iterdir()} == {
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"]) == (
        "<s>",
        "</s>",
        "<unk>",
        "</s>",
    )
    assert config["tokenizer_class"] == "InternLM2Tokenizer"
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    decoder = config["added_tokens_decoder"]
    assert sorted(v["content"] for v in decoder.values()) == sorted(demo_tokenizer.CHAT_TOKENS)
    for key, entry in decoder.items():
        assert entry == {
            "content": entry["content"],
            "special": True,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
        }
        assert sp.piece_to_id(entry["content"]) == int(key)
        assert sp.encode(entry["content"], out_type=int)[-1] == int(key)
        assert sp.encode("x" + entry["content"] + "y").count(int(key)) == 1
    # Same relative order as InternLM2's 92538..92543.
    ids = [sp.piece_to_id(t) for t in demo_tokenizer.CHAT_TOKENS]
    assert ids == sorted(ids) and ids[-1] - ids[0] == 5
    assert sp.get_piece_size() <= 512


def test_tokenizer_chat_template(tokenizer_dir: Path) -> None:
    jinja2 = pytest.importorskip("jinja2")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    template = jinja2.Environment().from_string(config["chat_template"])
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "It is red."}]
    assert template.render(bos_token="<s>", messages=messages, add_generation_prompt=False) == (
        "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nIt is red.<|im_end|>\n"
    )
    assert template.render(bos_token="<s>", messages=messages[:1], add_generation_prompt=True) == (
        "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


ROUND_TRIP = [
    "",
    " ",
    "\n",
    "A red circle.",
    "  two leading, two trailing  ",
    "multiple    inner   spaces",
    "tab\there\tand\ttrailing\t",
    "line one\nline two\n\nline four\r\n",
    "中文字符和标点。",
    "emoji 😀🎉👍🏽 and ZWJ 👨‍👩‍👧",
    "Ünïcödé çàfé naïve ß Ω ∑ ≠",
    "digits 1234567890 and 3.14159",
    "<s> </s> <unk> literal",
    "<|im_start|>user\nWhat color is the shape?<|im_end|>\n<|im_start|>assistant\nIt is red.<|im_end|>\n",
    "\x00\x01\x7f control",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trip(sp: spm.SentencePieceProcessor, text: str) -> None:
    ids = sp.encode(text)
    assert sp.unk_id() not in ids
    assert sp.decode(ids) == text


def test_tokenizer_round_trip_random_utf8(sp: spm.SentencePieceProcessor) -> None:
    rng = random.Random(0)
    pools = [
        " \t\n\r",
        "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789.,?!<>|",
        "".join(chr(c) for c in range(0x4E00, 0x4E40)),
        "".join(chr(c) for c in range(0x1F600, 0x1F620)),
    ]
    for _ in range(300):
        chars = []
        for _ in range(rng.randint(0, 40)):
            if rng.random() < 0.2:
                code = rng.randint(1, 0x10FFFF)
                # Surrogates are not UTF-8; U+2581 is sentencepiece's whitespace marker.
                while 0xD800 <= code <= 0xDFFF or code == 0x2581:
                    code = rng.randint(1, 0x10FFFF)
                chars.append(chr(code))
            else:
                chars.append(rng.choice(rng.choice(pools)))
        text = "".join(chars)
        assert sp.decode(sp.encode(text)) == text


def test_tokenizer_on_a_tiny_corpus(tmp_path: Path) -> None:
    out = demo_tokenizer.train_tokenizer(
        ["Hello world.", "It is red."], tmp_path / "tok", vocab_size=600
    )
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert 3 + 6 + 256 < sp.get_piece_size() <= 600
    assert sp.decode(sp.encode("新しい 😀\n  x")) == "新しい 😀\n  x"
    with pytest.raises(ValueError):
        demo_tokenizer.train_tokenizer([], tmp_path / "empty")
