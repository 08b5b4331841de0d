"""scripts/bench_train.py and its parts (scripts/benchlib/): the mix generator and the
identity of ours and the peer (same first-step loss on one batch) on tiny models."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import bench_train
import pytest
import torch
from benchlib.data import ANYRES_GRIDS, Setup, data_overrides, prepare_start
from benchlib.runs import benchmark, check_identity

from llava_tune.constants import IMAGE_TOKEN
from llava_tune.demo import mix as make_mix
from llava_tune.demo import scenes

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- the mix


def test_mix_has_665k_structure():
    records = make_mix.mix_records(600, seed=0)
    turns = Counter(len(r["conversations"]) // 2 for r in records)
    assert set(turns) == set(range(1, 9))  # every count from 1 to 8 turns, nothing else
    text_only = [r for r in records if "image" not in r]
    assert len(text_only) == 200  # a third, exactly: round(600 / 3)
    assert not any(IMAGE_TOKEN in t["value"] for r in text_only for t in r["conversations"])
    for r in records:
        roles = [t["from"] for t in r["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2)
        if "image" in r:  # one <image>, in the first question, at its start or end
            values = [t["value"] for t in r["conversations"]]
            assert sum(v.count(IMAGE_TOKEN) for v in values) == 1
            assert values[0].startswith(IMAGE_TOKEN) or values[0].endswith(IMAGE_TOKEN)
    answers = [len(t["value"].split()) for r in records for t in r["conversations"]
               if t["from"] == "gpt"]
    assert min(answers) == 1 and max(answers) >= 150  # short VQA answers and long ones
    multi_turn_text = sum(len(r["conversations"]) > 2 for r in text_only)
    assert multi_turn_text > len(text_only) / 3
    stats = make_mix.mix_stats(records)
    assert stats["text_only_fraction"] == pytest.approx(1 / 3, abs=1e-3)
    assert stats["turns"] == dict(sorted(turns.items()))


def test_mix_is_deterministic_and_uses_the_demo_words(tmp_path):
    assert make_mix.mix_records(50, seed=3) == make_mix.mix_records(50, seed=3)
    assert make_mix.mix_records(50, seed=3) != make_mix.mix_records(50, seed=4)
    words = set(make_mix.vocabulary())
    text = " ".join(t["value"] for r in make_mix.mix_records(50, seed=3) for t in r["conversations"])
    text = text.replace(IMAGE_TOKEN, " ").replace(".", " ").replace("?", " ")
    used = {w.lower() for w in text.split()}
    assert used <= words
    a, b = tmp_path / "a", tmp_path / "b"
    summary = make_mix.generate_mix(a, 9, seed=1, image_size=24)
    make_mix.generate_mix(b, 9, seed=1, image_size=24)
    images = sorted(p.name for p in (a / "images").iterdir())
    assert len(images) == summary["images"] == 9 - round(9 / 3)
    assert (a / "mix.json").read_bytes() == (b / "mix.json").read_bytes()
    assert all((a / "images" / n).read_bytes() == (b / "images" / n).read_bytes() for n in images)
    records = json.loads((a / "mix.json").read_text())
    assert sorted(r["image"] for r in records if "image" in r) == images


def test_1_8b_refuses_the_cpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_train.main(["--size", "1_8b", "--data", "mix"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


# --------------------------------------------------------------------------- ours vs peer


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_lm, tiny_vision) -> Setup:
    """The bench's shared inputs on the tiny fixture models and 12 mix records."""
    work = tmp_path_factory.mktemp("bench")
    make_mix.generate_mix(work / "mix", 12, seed=0, image_size=40)
    setup = Setup(
        config=REPO / "configs/demo/finetune.yaml", llm=tiny_lm, vision_name="tiny-vit",
        vision_config=tiny_vision[0], vision_weights=tiny_vision[1], data=work / "mix" / "mix.json",
        image_folder=work / "mix" / "images", max_length=160, work=work)
    prepare_start(setup)
    return setup


def test_check_gives_both_systems_the_same_first_loss(tiny_setup):
    result = check_identity(tiny_setup, batch_size=4, in_process=True)
    assert abs(result["ours"] - math.log(512)) < 0.5  # a random LM over 512 tokens
    assert result["abs_diff"] < 1e-4, result
    assert result["trainable"]["ours"] == result["trainable"]["peer"]


@pytest.fixture(scope="module")
def tiny_anyres_setup(tmp_path_factory, tiny_lm, tiny_vision) -> Setup:
    """--data anyres on the tiny fixtures: detail scenes of exactly the grids' shapes at the
    32-px tower, exported as LlavaNext for the peer."""
    work = tmp_path_factory.mktemp("bench-anyres")
    sizes = [(cols * 32, rows * 32) for rows, cols in ANYRES_GRIDS]
    # Seed 3: the first three images are tall, square and wide, one of each grid.
    paths = scenes.write_detail(work / "detail", 6, 0, seed=3, sizes=sizes, shape_size=(8, 14))
    setup = Setup(
        config=REPO / "configs/demo/finetune.yaml", llm=tiny_lm, vision_name="tiny-vit",
        vision_config=tiny_vision[0], vision_weights=tiny_vision[1], data=paths["train"],
        image_folder=paths["image_folder"], max_length=160, work=work,
        extra=tuple(data_overrides("anyres")))
    prepare_start(setup)
    return setup


def test_anyres_check_gives_llava_next_the_same_first_loss(tiny_anyres_setup):
    """The peer's LlavaNext reads the same tiles, sizes and tokens: equal first-step loss and
    trainable parameters (image_newline included) on a batch of wide, tall and square images."""
    assert tiny_anyres_setup.export.name == "hf-llava-next"
    from PIL import Image

    records = json.loads(tiny_anyres_setup.data.read_text())[:6]
    sizes = {Image.open(tiny_anyres_setup.image_folder / r["image"]).size for r in records}
    assert sizes == {(128, 32), (32, 128), (64, 64)}
    result = check_identity(tiny_anyres_setup, batch_size=6, in_process=True)
    assert result["abs_diff"] < 1e-4, result
    assert result["trainable"]["ours"] == result["trainable"]["peer"]


@pytest.mark.slow
def test_benchmark_measures_both(tiny_setup):
    """With the peer at its best for mixed lengths (--peer-sampling group_by_length, the
    default for --data mix): the Trainer's LengthGroupedSampler, and ours grouping too."""
    setup = dataclasses.replace(tiny_setup, peer_sampling="group_by_length")
    result = benchmark(setup, steps=2, warmup=1, batch_size=4, repeats=1,
                       extra=[], log=lambda message: None)
    spec = json.loads((setup.work / "runs" / "peer-1" / "spec.json").read_text())
    assert spec["sampling"] == "group_by_length"
    assert "data.group_by_length=True" in spec["overrides"]
    for system in ("ours", "peer"):
        (run,) = result[system]["runs"]
        assert run["steps"] == 1 and run["tokens"] > 0 and run["seconds"] > 0
        assert result[system]["median"]["peak_mb"] > 100  # an RSS with torch loaded
    ratio = result["ours_over_peer"]
    assert ratio["tokens_per_s"] == pytest.approx(ratio["samples_per_s"])
    assert result["data"]["samples"] == 12
    assert result["data"]["text_only_fraction"] == pytest.approx(4 / 12, abs=1e-3)


def test_real_vocabulary_lm(tmp_path, shapes_data):
    """--vocab real: the demo's layers with InternLM2's own tokenizer and vocabulary."""
    from benchlib.data import REAL_TOKENIZER

    if not (REAL_TOKENIZER / "tokenizer.model").is_file():
        pytest.skip(f"InternLM2's tokenizer is not in {REAL_TOKENIZER} (a fresh clone)")
    from llava_tune.demo.make import LM_SHAPE, make_lm

    lm = make_lm(tmp_path / "lm", [], seed=0, tokenizer=REAL_TOKENIZER)
    config = json.loads((lm / "config.json").read_text())
    assert config["vocab_size"] == 92544 and config["hidden_size"] == LM_SHAPE["hidden_size"]
    assert (lm / "tokenizer.model").read_bytes() == (REAL_TOKENIZER / "tokenizer.model").read_bytes()
