"""Batched generation (eval) answers exactly as one conversation at a time (chat)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_tune.build.model import load_run
from llava_tune.config import load_config
from llava_tune.data.image import load_image
from llava_tune.inference.generate import GenerationSettings, generate, generate_batch
from llava_tune.training.loop import train

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_lm, tiny_vision, shapes_data) -> Path:
    run = tmp_path_factory.mktemp("gen") / "run"
    train(load_config(DEMO / "finetune.yaml", [
        f"model.llm={tiny_lm}", "model.vision.name=tiny-vit",
        f"model.vision.config_file={tiny_vision[0]}", f"model.vision.pretrained={tiny_vision[1]}",
        f"data.train={shapes_data / 'finetune.json'}", f"data.image_folder={shapes_data / 'images'}",
        "init_from=null", f"run_dir={run}", "train.max_steps=4", "data.max_length=64",
        "train.batch_size=8"]))
    return run


def test_batched_greedy_answers_equal_one_at_a_time(finetuned, shapes_data):
    built = load_run(finetuned)
    settings = GenerationSettings(max_new_tokens=12)
    records = json.loads((shapes_data / "heldout.json").read_text())[:6]
    conversations = []
    for i, record in enumerate(records):
        question = record["conversations"][0]["value"]
        images = [load_image(shapes_data / "images" / record["image"])]
        if i % 3 == 2:  # a text-only question among them, and another length of prompt
            question, images = "Describe a red circle in a few words, please.", []
        conversations.append(([{"role": "user", "content": question}], images))
    alone = [generate(built, messages, images, settings) for messages, images in conversations]
    together = generate_batch(built, conversations, settings)
    assert together == alone
    assert len(set(alone)) > 1  # the prompts really differ in what they produce
