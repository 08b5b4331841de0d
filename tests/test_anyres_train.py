"""anyres through the pipeline: images of several aspect ratios counted, trained (plain,
packed, from a feature cache), started from a pad stage 1, and answered in chat."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SMALL
from PIL import Image
from safetensors.torch import load_file

from llava_tune.assembly.model import load_model, load_run
from llava_tune.config import load_config
from llava_tune.data.collate import Collator
from llava_tune.errors import UserError
from llava_tune.inference.generate import generate
from llava_tune.models.anyres import Media
from llava_tune.training import train
from llava_tune.training.setup import build_dataset, build_for_training

DEMO = Path(__file__).parent.parent / "configs" / "demo"
SIZES = [(32, 96), (96, 32), (64, 64), (30, 45), (200, 250)]
"""(height, width): wide, tall, square, small, larger than every grid (scaled down)."""
ANYRES = ["model.image_aspect=anyres", "model.anyres.grid_pinpoints=[[1,2],[2,1],[2,2],[1,3],[3,1]]"]


@pytest.fixture(scope="module")
def aspect_data(tmp_path_factory) -> Path:
    """Records about images of the sizes above: a colored box on white, its color asked."""
    out = tmp_path_factory.mktemp("aspect")
    (out / "images").mkdir()
    records = []
    colors = {"red": (220, 40, 40), "blue": (40, 80, 220)}
    for i in range(16):
        height, width = SIZES[i % len(SIZES)]
        name, rgb = list(colors.items())[i % 2]
        image = Image.new("RGB", (width, height), (255, 255, 255))
        image.paste(rgb, (width // 4, height // 4, width // 2, height // 2))
        image.save(out / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"},
            {"from": "gpt", "value": f"It is {name}."}]})
    (out / "train.json").write_text(json.dumps(records))
    return out


def overrides(stage_overrides, aspect_data: Path, run: str, *extra: str) -> list[str]:
    return [*stage_overrides("finetune", run), *SMALL, "data.max_length=128", "init_from=null",
            f"data.train={aspect_data / 'train.json'}",
            f"data.image_folder={aspect_data / 'images'}", *ANYRES, *extra]


def test_each_image_takes_its_own_token_count(stage_overrides, aspect_data):
    config = load_config(DEMO / "finetune.yaml", overrides(stage_overrides, aspect_data, "count"))
    bundle, _ = build_for_training(config, device="cpu")
    layout = bundle.model.layout
    assert layout.anyres and bundle.model.projector.image_newline is not None
    dataset = build_dataset(config, bundle, config.data.train)
    assert dataset.report.scaled_down == 3  # the 200 x 250 images: no grid holds them
    assert "3 images larger than every anyres grid" in dataset.report.summary()
    assert "(the largest: 64 x 64 px" in dataset.report.summary()
    items = [dataset[i] for i in range(len(SIZES))]
    for item, size in zip(items, SIZES, strict=True):
        assert item["media"] == [Media("image", size)]
        assert int((item["input_ids"] == -200).sum()) == layout.num_tokens(size)
        assert item["pixel_values"].shape[0] == layout.num_tiles(size)
    assert len({layout.num_tokens(size) for size in SIZES}) > 2
    assert dataset.lengths()[: len(SIZES)] == [len(item["input_ids"]) for item in items]
    batch = Collator(bundle.tokenizer.pad_token_id)(items)
    with torch.no_grad():
        out = bundle.model(**batch.model_inputs())
    assert torch.isfinite(out.loss_sum) and out.num_tokens > 0


@pytest.mark.parametrize("extra", [[], ["data.pack=true"], ["data.feature_cache=FEATURES"]],
                         ids=["plain", "packed", "feature-cache"])
def test_anyres_trains_the_newline_and_chats(stage_overrides, aspect_data, tmp_path, extra):
    extra = [e.replace("FEATURES", str(tmp_path / "features")) for e in extra]
    config = load_config(DEMO / "finetune.yaml", overrides(
        stage_overrides, aspect_data, "run", "train.max_steps=3", *extra))
    result = train(config)
    saved = load_file(result.run_dir / "projector" / "model.safetensors")
    assert saved["image_newline"].shape == (config_hidden(result.run_dir),)
    bundle = load_run(result.run_dir, device="cpu")
    assert bundle.model.layout.anyres
    assert torch.equal(bundle.model.projector.image_newline.detach().cpu(), saved["image_newline"])
    wide = Image.open(aspect_data / "images" / "0.png")
    answer = generate(bundle, [{"role": "user", "content": "<image>\nWhat color is the shape?"}],
                      [wide])
    assert isinstance(answer, str)


def config_hidden(run_dir: Path) -> int:
    return json.loads((run_dir / "projector" / "config.json").read_text())["llm_hidden_size"]


def test_newline_learns(stage_overrides, aspect_data):
    """image_newline trains with the projector: it moves from its initial value."""
    config = load_config(DEMO / "finetune.yaml", overrides(
        stage_overrides, aspect_data, "learn", "train.max_steps=1", "train.seed=3"))
    bundle, _ = build_for_training(config, device="cpu")
    assert bundle.model.projector.image_newline.requires_grad
    torch.manual_seed(3)
    result = train(config)
    saved = load_file(result.run_dir / "projector" / "model.safetensors")["image_newline"]
    assert not torch.equal(saved, bundle.model.projector.image_newline.detach())


def test_anyres_stage2_from_a_pad_stage1(stage_overrides, aspect_data, tmp_path):
    """LLaVA-NeXT's recipe: the pad stage 1 projector carries over, the newline starts fresh;
    the other way round is refused naming both settings."""
    stage1 = load_config(DEMO / "pretrain.yaml", [
        *stage_overrides("pretrain", "stage1"), *SMALL, "train.max_steps=1"])
    pad_run = train(stage1).run_dir
    stage2 = train(load_config(DEMO / "finetune.yaml", overrides(
        stage_overrides, aspect_data, "stage2", "train.max_steps=1", f"init_from={pad_run}")))
    assert "image_newline" in load_file(stage2.run_dir / "projector" / "model.safetensors")
    back = load_config(DEMO / "finetune.yaml", [
        *stage_overrides("finetune", "back"), *SMALL, "train.max_steps=1",
        f"init_from={stage2.run_dir}"])
    with pytest.raises(UserError, match="image_aspect=anyres"):
        train(back)


def test_bad_anyres_settings_are_reported_together(stage_overrides, aspect_data):
    with pytest.raises(UserError) as err:
        load_config(DEMO / "finetune.yaml", overrides(
            stage_overrides, aspect_data, "bad", "model.anyres.grid_pinpoints=[[0,2],[1]]",
            "model.anyres.pool_max=0"))
    assert "grid_pinpoints" in str(err.value) and "pool_max=0" in str(err.value)
    with pytest.raises(UserError, match="image_aspect='tiles'; use one of pad, anyres"):
        load_config(DEMO / "finetune.yaml", overrides(
            stage_overrides, aspect_data, "bad2", "model.image_aspect=tiles"))


@pytest.fixture(scope="module")
def anyres_run(tmp_path_factory, tiny_lm, tiny_vision, shapes_data, aspect_data) -> Path:
    """A full-precision anyres finetune run (LoRA on the LM), 3 steps."""
    from helpers import fixture_overrides

    from llava_tune.cli import main

    run = tmp_path_factory.mktemp("anyres") / "run"
    assert main(["train", str(DEMO / "finetune.yaml"),
                 *fixture_overrides("finetune", tiny_lm, tiny_vision, shapes_data, run),
                 *SMALL, "data.max_length=128", "init_from=null", "model.quantization=null",
                 "train.max_steps=3", "train.lora.r=4", "train.lr=1e-2",
                 f"data.train={aspect_data / 'train.json'}",
                 f"data.image_folder={aspect_data / 'images'}", *ANYRES]) == 0
    return run


@pytest.mark.parametrize("image", ["0.png", "1.png", "3.png", "4.png"])
def test_hf_llava_next_export_matches_our_logits_and_answers(anyres_run, aspect_data, tmp_path,
                                                             image):
    """transformers' LlavaNext, from the export's own processor, gives our logits and our
    greedy answer: wide, tall, small and scaled-down images."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from llava_tune.cli import main
    from llava_tune.constants import IMAGE_TOKEN_INDEX
    from llava_tune.data.template import expand_image_slots
    from llava_tune.inference.generate import GenerationSettings

    out = tmp_path / "next"
    assert main(["export", str(anyres_run), str(out), "--format", "hf-llava-next"]) == 0
    processor = AutoProcessor.from_pretrained(out)
    model = LlavaNextForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    picture = Image.open(aspect_data / "images" / image)
    question = "What color is the shape?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=picture, text=prompt, return_tensors="pt")

    ours = load_run(anyres_run, device="cpu")
    size = (picture.height, picture.width)
    ids = ours.template.prompt_ids([{"role": "user", "content": f"<image>\n{question}"}],
                                   ours.tokenizer)
    image_id = ours.tokenizer.convert_tokens_to_ids("<image>")
    expanded, _ = expand_image_slots(ids, None, image_id, [ours.model.layout.num_tokens(size)])
    hf_ids = inputs["input_ids"][0].tolist()
    assert [image_id if t == IMAGE_TOKEN_INDEX else t for t in expanded] == hf_ids
    pixels = ours.image_processor(picture)
    torch.testing.assert_close(inputs["pixel_values"][0], pixels, rtol=0, atol=1e-5)
    with torch.no_grad():
        theirs = model(**inputs).logits[0]
        mine = ours.model.logits(torch.tensor([expanded]), pixels, media=[Media("image", size)])[0]
    torch.testing.assert_close(theirs[:, : mine.shape[-1]], mine, rtol=1e-4, atol=1e-4)
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer = processor.decode(generated[0, len(hf_ids):], skip_special_tokens=True).strip()
    user = [{"role": "user", "content": f"<image>\n{question}"}]
    assert answer == generate(ours, user, [picture], GenerationSettings(max_new_tokens=6))
    # The export reads back as a model of ours, answering the same.
    again = load_model(out, device="cpu")
    assert again.model.layout == ours.model.layout
    assert generate(again, user, [picture], GenerationSettings(max_new_tokens=6)) == answer


def test_exports_refuse_a_format_that_cannot_hold_the_run(anyres_run, tmp_path, capsys):
    from llava_tune.cli import main

    assert main(["export", str(anyres_run), str(tmp_path / "a"), "--format", "hf-llava"]) == 2
    assert "--format hf-llava-next" in capsys.readouterr().err
    assert main(["export", str(anyres_run), str(tmp_path / "b"), "--format", "xtuner"]) == 2
    assert "XTuner's LLaVA cannot" in capsys.readouterr().err
