"""Fast checks of the demo's scenes (llava_tune/demo/scenes.py): small details on large images,
pairs of images and clips of frames, read back through the trainer's own readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_tune.constants import IMAGE_TOKEN, VIDEO_TOKEN
from llava_tune.data.formats import read_conversations
from llava_tune.data.video import load_video
from llava_tune.demo import scenes, shapes

REPO = Path(__file__).resolve().parents[1]
WHITE = (255, 255, 255)
RGB_NAMES = {rgb: name for name, rgb in shapes.COLORS.items()}
WRITERS: dict[str, Callable[..., dict[str, Path]]] = {
    "detail": scenes.write_detail, "pair": scenes.write_pairs, "clip": scenes.write_clips}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def _shape_color(pixels: np.ndarray) -> str:
    """The name of the one non-white color of an image (asserting there is exactly one)."""
    shape = _mask(pixels)
    assert shape.any() and not shape.all()
    colors = {tuple(int(v) for v in c) for c in np.unique(pixels[shape], axis=0)}
    assert len(colors) == 1, colors
    return RGB_NAMES[colors.pop()]


def _mask(pixels: np.ndarray) -> np.ndarray:
    """Where the image is not white."""
    return np.any(pixels != np.array(WHITE, dtype=np.uint8), axis=-1)


def _components(mask: np.ndarray) -> int:
    """Number of 8-connected components of a small mask."""
    left = set(zip(*(a.tolist() for a in np.nonzero(mask)), strict=True))
    count = 0
    while left:
        count += 1
        stack = [left.pop()]
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if (y + dy, x + dx) in left:
                        left.remove((y + dy, x + dx))
                        stack.append((y + dy, x + dx))
    return count


def _classify(mask: np.ndarray) -> str:
    """Tell the shape from how much of its bounding box it fills: square ~1, circle ~0.79,
    triangle ~0.5, star ~0.34."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    return "square" if fill > 0.9 else "circle" if fill > 0.65 else (
        "triangle" if fill > 0.42 else "star")


def _answer(record: dict) -> str:
    return record["conversations"][1]["value"]


def _question(record: dict) -> str:
    return record["conversations"][0]["value"]


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    out = tmp_path_factory.mktemp("scenes")
    return {"detail": scenes.write_detail(out, 40, 12, seed=3),
            "pair": scenes.write_pairs(out, 40, 12, seed=3),
            "clip": scenes.write_clips(out, 12, 4, seed=3, questions=("end", "start"))}


# --------------------------------------------------------------------------- all kinds


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("kind", scenes.KINDS)
def test_deterministic_for_a_seed(kind: str, tmp_path: Path) -> None:
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        WRITERS[kind](tmp_path / name, 4, 2, seed=seed)
    a, b, c = (_tree(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


@pytest.mark.parametrize("kind", scenes.KINDS)
def test_test_split_does_not_depend_on_n_train(kind: str, tmp_path: Path) -> None:
    small = WRITERS[kind](tmp_path / "small", 2, 3, seed=1)
    large = WRITERS[kind](tmp_path / "large", 7, 3, seed=1)
    assert small["test"].read_bytes() == large["test"].read_bytes()
    folder = {"detail": "detail/test", "pair": "pair/test", "clip": "clip/test"}[kind]
    assert _tree(tmp_path / "small" / folder) == _tree(tmp_path / "large" / folder)
    assert len(_load(large["train"])) > len(_load(small["train"]))


@pytest.mark.parametrize(("kind", "images", "media"), [
    ("detail", 52, "image"), ("pair", 52, "image"), ("clip", 16, "video")])
def test_the_trainers_reader_reads_every_record(
    written: dict[str, dict[str, Path]], kind: str, images: int, media: str
) -> None:
    paths = written[kind]
    assert set(paths) == {"train", "test", "image_folder"}
    count = 0
    for split in ("train", "test"):
        raw = _load(paths[split])
        result = read_conversations(paths[split])
        assert not result.problems and len(result.records) == len(raw)
        for record in result.records:
            assert record["kinds"] == {"detail": ["image"], "pair": ["image", "image"],
                                       "clip": ["video"]}[kind]
            assert record["messages"][0]["content"].count(IMAGE_TOKEN) == len(record["images"])
            assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
            for item in record["images"]:
                assert (paths["image_folder"] / item).exists()
        count += len({json.dumps(r[media]) for r in raw})
    assert count == images


# --------------------------------------------------------------------------- detail


def test_detail_images_hold_one_small_shape_of_the_answered_color(
    written: dict[str, dict[str, Path]]
) -> None:
    paths = written["detail"]
    seen_sizes, shape_names = set(), set()
    for split in ("train", "test"):
        records = _load(paths[split])
        assert len(records) == 2 * {"train": 40, "test": 12}[split]
        for color_record, shape_record in zip(records[::2], records[1::2], strict=True):
            assert color_record["image"] == shape_record["image"]
            assert color_record["image"].startswith(f"detail/{split}/")
            assert _question(color_record) == f"{IMAGE_TOKEN}\n{shapes.COLOR_QUESTION}"
            assert _question(shape_record) == f"{IMAGE_TOKEN}\n{shapes.SHAPE_QUESTION}"
            pixels = _pixels(paths["image_folder"] / color_record["image"])
            height, width = pixels.shape[:2]
            assert (width, height) in scenes.DETAIL_SIZES
            seen_sizes.add((width, height))
            color = _shape_color(pixels)
            assert _answer(color_record) == shapes.color_answer(color)
            mask = _mask(pixels)
            assert _components(mask) == 1
            ys, xs = np.nonzero(mask)
            extent = max(np.ptp(ys), np.ptp(xs)) + 1
            # The box's side is in [20, 32]; a star spans 0.9-0.95 of it, pixels +-1.
            assert 0.85 * 20 - 1 <= extent <= 32 + 1
            shape = _classify(mask)
            shape_names.add(shape)
            assert _answer(shape_record) == shapes.shape_answer(shape)
    assert seen_sizes == set(scenes.DETAIL_SIZES)
    assert shape_names == set(shapes.SHAPES)


def test_draw_shape_on_a_square_canvas_equals_draw_shape() -> None:
    for shape in shapes.SHAPES:
        ours = scenes.draw_shape_on(112, 112, shape, "red", 50.3, (56.2, 55.7))
        theirs = shapes.draw_shape(shape, "red", 50.3, (56.2, 55.7))
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    wide = np.asarray(scenes.draw_shape_on(448, 112, "square", "blue", 20.0, (400.0, 30.0)))
    assert wide.shape == (112, 448, 3)
    ys, xs = np.nonzero(np.all(wide == shapes.COLORS["blue"], axis=-1))
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (390, 409, 20, 39)


# --------------------------------------------------------------------------- pair


def test_pairs_ask_the_second_images_color_and_a_balanced_same_shape(
    written: dict[str, dict[str, Path]]
) -> None:
    paths = written["pair"]
    prefix = f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n"
    for split, pairs in (("train", 40), ("test", 12)):
        records = _load(paths[split])
        assert len(records) == 2 * pairs
        answers = []
        for color_record, same_record in zip(records[::2], records[1::2], strict=True):
            a, b = color_record["image"]
            assert same_record["image"] == [a, b]
            assert a.endswith("-a.png") and b.endswith("-b.png")
            assert _question(color_record) == prefix + scenes.PAIR_COLOR_QUESTION
            assert _question(same_record) == prefix + scenes.PAIR_SAME_QUESTION
            pixels = [_pixels(paths["image_folder"] / p) for p in (a, b)]
            assert all(p.shape == (112, 112, 3) for p in pixels)
            assert _answer(color_record) == shapes.color_answer(_shape_color(pixels[1]))
            masks = [_mask(p) for p in pixels]
            same = _classify(masks[0]) == _classify(masks[1])
            assert _answer(same_record) == (scenes.YES if same else scenes.NO)
            answers.append(_answer(same_record))
        assert answers.count(scenes.YES) == answers.count(scenes.NO) == pairs // 2


def test_an_odd_number_of_pairs_is_as_balanced_as_it_can_be(tmp_path: Path) -> None:
    records = _load(scenes.write_pairs(tmp_path, 7, 0)["train"])
    assert _load(tmp_path / "pair_test.json") == []
    assert sum(_answer(r) == scenes.YES for r in records[1::2]) in (3, 4)


# --------------------------------------------------------------------------- clip


def test_clips_change_color_once_inside_the_clip(written: dict[str, dict[str, Path]]) -> None:
    paths = written["clip"]
    for split, clips in (("train", 12), ("test", 4)):
        records = _load(paths[split])
        assert len(records) == 2 * clips
        for end, start in zip(records[::2], records[1::2], strict=True):
            assert end["video"] == start["video"] and "image" not in end
            assert _question(end) == f"{VIDEO_TOKEN}\n{scenes.CLIP_END_QUESTION}"
            assert _question(start) == f"{VIDEO_TOKEN}\n{scenes.CLIP_START_QUESTION}"
            folder = paths["image_folder"] / end["video"]
            files = sorted(folder.iterdir())
            assert [f.name for f in files] == [f"{k:02d}.png" for k in range(8)]
            colors = [_shape_color(_pixels(f)) for f in files]
            first, last = colors[0], colors[-1]
            assert first != last
            change = colors.index(last)
            assert 1 <= change <= 7
            assert colors == [first] * change + [last] * (8 - change)
            assert _answer(end) == shapes.color_answer(last)
            assert _answer(start) == shapes.color_answer(first)
            masks = [_mask(_pixels(f)) for f in files]
            assert len({_classify(m) for m in masks}) == 1
            areas = [int(m.sum()) for m in masks]
            assert max(areas) <= 1.1 * min(areas)
            frames = load_video(folder, 8)
            assert len(frames) == 8 and all(f.size == (112, 112) for f in frames)


def test_clips_ask_only_the_end_by_default(tmp_path: Path) -> None:
    records = _load(scenes.write_clips(tmp_path, 3, 1, frames=4)["train"])
    assert [_question(r) for r in records] == [f"{VIDEO_TOKEN}\n{scenes.CLIP_END_QUESTION}"] * 3
    assert len(list((tmp_path / records[0]["video"]).iterdir())) == 4
    with pytest.raises(ValueError, match="questions"):
        scenes.write_clips(tmp_path, 1, 0, questions=("middle",))


# --------------------------------------------------------------------------- command line


def test_main_writes_the_files_and_prints_their_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert scenes.main(["--kind", "pair", "--out", str(tmp_path), "--train", "2",
                        "--test", "1", "--seed", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"train": str(tmp_path / "pair_train.json"),
                       "test": str(tmp_path / "pair_test.json"), "image_folder": str(tmp_path)}
    assert len(_load(Path(printed["train"]))) == 4


def test_module_runs_as_a_script(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "llava_tune.demo.scenes", "--kind", "clip", "--out",
         str(tmp_path), "--train", "1", "--test", "1"],
        capture_output=True, text=True, env=env, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["train"] == str(tmp_path / "clip_train.json")
    assert len(list((tmp_path / "clip" / "train" / "000000").iterdir())) == 8
