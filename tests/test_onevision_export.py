"""export --format hf-llava-onevision: a run trained on single images (tiles, pooled over
the cap), pairs of images (a square each) and clips equals transformers' LlavaOnevision on
the same inputs, through the export's own processor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SMALL, fixture_overrides
from PIL import Image
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

from llava_tune.assembly.model import load_run
from llava_tune.cli import main
from llava_tune.constants import IMAGE_TOKEN_INDEX
from llava_tune.data.video import load_video
from llava_tune.inference.generate import GenerationSettings, build_prompt, generate

DEMO = Path(__file__).parent.parent / "configs" / "demo"
ONEVISION = ["model.image_aspect=anyres", "model.anyres.grid_pinpoints=[[1,2],[2,1],[2,2],[1,3],[3,1]]",
             "model.anyres.multi_image=square", "model.anyres.pool_max=2", "data.video_frames=4"]
RGB = {"red": (220, 40, 40), "blue": (40, 80, 220)}


def box(width: int, height: int, color: str) -> Image.Image:
    image = Image.new("RGB", (width, height), (255, 255, 255))
    image.paste(RGB[color], (width // 4, height // 4, width // 2, height // 2))
    return image


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onevision")
    (out / "clip").mkdir()
    for i, color in enumerate(["red", "red", "blue", "blue"]):
        box(32, 32, color).save(out / "clip" / f"{i}.png")
    box(96, 32, "red").save(out / "wide.png")
    box(64, 64, "blue").save(out / "square.png")
    question = [{"from": "gpt", "value": "It is red."}]
    records = [
        {"id": "one", "image": "wide.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"}, *question]},
        {"id": "two", "image": ["wide.png", "square.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich is red?"}, *question]},
        {"id": "clip", "video": "clip", "conversations": [
            {"from": "human", "value": "<video>\nWhat color is it at the end?"}, *question]},
    ] * 4
    (out / "train.json").write_text(json.dumps(records))
    return out


@pytest.fixture(scope="module")
def onevision_run(tmp_path_factory, tiny_lm, tiny_vision, shapes_data, mixed_data) -> Path:
    run = tmp_path_factory.mktemp("onevision-run") / "run"
    assert main(["train", str(DEMO / "finetune.yaml"),
                 *fixture_overrides("finetune", tiny_lm, tiny_vision, shapes_data, run),
                 *SMALL, "data.max_length=128", "init_from=null", "model.quantization=null",
                 "train.max_steps=3", "train.lora.r=4", "train.lr=1e-2",
                 f"data.train={mixed_data / 'train.json'}", f"data.image_folder={mixed_data}",
                 *ONEVISION]) == 0
    return run


@pytest.fixture(scope="module")
def exported(onevision_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onevision-export") / "ov"
    assert main(["export", str(onevision_run), str(out), "--format", "hf-llava-onevision"]) == 0
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    return AutoProcessor.from_pretrained(out), model.eval(), load_run(onevision_run, device="cpu")


def check_parity(exported, content: list[dict], ours_text: str, visuals, hf_visuals: dict):
    """The processor's ids are our prompt's; its logits on OUR pixels are ours; greedy
    answers from its own pixels are chat's."""
    processor, model, ours = exported
    prompt = processor.apply_chat_template([{"role": "user", "content": content}],
                                           add_generation_prompt=True)
    inputs = processor(text=prompt, return_tensors="pt", **hf_visuals)
    user = [{"role": "user", "content": ours_text}]
    mine = build_prompt(ours, user, visuals)
    hf_ids = inputs["input_ids"][0].tolist()
    marker_ids = {processor.image_token_id, processor.video_token_id}
    assert [-1 if t in marker_ids else t for t in hf_ids] == [
        -1 if t == IMAGE_TOKEN_INDEX else t for t in mine.ids]
    with torch.no_grad():
        logits = ours.model.logits(torch.tensor([mine.ids]), mine.pixels, media=mine.media)[0]
        theirs = model(**inputs).logits[0]
    torch.testing.assert_close(theirs[:, : logits.shape[-1]], logits, rtol=1e-4, atol=1e-4)
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer = processor.decode(generated[0, len(hf_ids):], skip_special_tokens=True).strip()
    assert answer == generate(ours, user, visuals, GenerationSettings(max_new_tokens=6))
    return inputs, mine


def test_single_image_pooled_tiles_match(exported, mixed_data):
    wide = Image.open(mixed_data / "wide.png")
    processor = exported[0]
    assert processor.vision_aspect_ratio == "anyres_max_2"
    inputs, mine = check_parity(exported, [{"type": "image"}, {"type": "text", "text": "Q?"}],
                                "<image>\nQ?", [wide], {"images": wide})
    torch.testing.assert_close(inputs["pixel_values"][0], mine.pixels, rtol=0, atol=1e-5)
    # The map of the 1 x 3 grid (2 x 6 features) is over 1.1 x 2 tiles' worth: pooled.
    assert exported[2].model.layout.num_tokens((32, 96)) == 4 + 1 * (4 + 1)


def test_two_images_are_squares_with_newlines(exported, mixed_data):
    images = [Image.open(mixed_data / "wide.png"), Image.open(mixed_data / "square.png")]
    inputs, mine = check_parity(
        exported, [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which?"}],
        "<image>\n<image>\nWhich?", images, {"images": [images]})
    assert [m.kind for m in mine.media] == ["square", "square"]
    torch.testing.assert_close(inputs["pixel_values"][0, :1], mine.pixels[:1], rtol=0, atol=1e-5)


def test_video_frames_match(exported, mixed_data):
    frames = load_video(mixed_data / "clip", 4)
    video = np.stack([np.asarray(frame) for frame in frames])
    inputs, mine = check_parity(exported, [{"type": "video"}, {"type": "text", "text": "End?"}],
                                "<image>\nEnd?", [frames], {"videos": [video]})
    torch.testing.assert_close(inputs["pixel_values_videos"][0], mine.pixels, rtol=0, atol=2e-2)


def test_onevision_refuses_a_run_that_tiles_several_images(onevision_run, tmp_path, capsys):
    assert main(["export", str(onevision_run), str(tmp_path / "n"), "--format",
                 "hf-llava-next"]) == 2
    assert "--format hf-llava-onevision" in capsys.readouterr().err
