"""Exports keep the model's numbers: hf-llava through plain transformers, llm and internlm2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlamaForCausalLM, LlavaForConditionalGeneration

from llava_tune.assembly.llm import load_llm
from llava_tune.assembly.model import load_run
from llava_tune.cli import main
from llava_tune.constants import IMAGE_TOKEN_INDEX

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What color is the shape?"


@pytest.fixture
def finetune_run(stage_overrides, tmp_path) -> Path:
    overrides = stage_overrides("finetune") + [
        "init_from=null", "model.quantization=null", "train.max_steps=2", "train.batch_size=4",
        "data.max_length=64", "train.lora.r=4"]
    assert main(["train", str(REPO / "configs/demo/finetune.yaml"), *overrides]) == 0
    return tmp_path / "run"


def test_hf_llava_export_matches_our_logits_and_answers(finetune_run, shapes_data, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", str(finetune_run), str(out), "--format", "hf-llava"]) == 0
    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    image = Image.open(shapes_data / "images" / "heldout" / "000000.png")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")

    ours = load_run(finetune_run)
    ids = ours.template.prompt_ids([{"role": "user", "content": f"<image>\n{QUESTION}"}],
                                   ours.tokenizer)
    image_id = ours.tokenizer.convert_tokens_to_ids("<image>")
    n = ours.model.vision.num_patches
    expanded = [t for i in ids for t in ([IMAGE_TOKEN_INDEX] * n if i == image_id else [i])]
    hf_ids = inputs["input_ids"][0].tolist()
    assert [image_id if t == IMAGE_TOKEN_INDEX else t for t in expanded] == hf_ids
    pixels = ours.image_processor(image)
    assert torch.allclose(inputs["pixel_values"], pixels, atol=1e-5)
    with torch.no_grad():
        theirs = model(**inputs).logits[0]
        mine = ours.model.logits(torch.tensor([expanded]), pixels)[0]
    assert torch.allclose(theirs[:, : mine.shape[-1]], mine, atol=1e-4)

    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer = processor.decode(generated[0, len(hf_ids):], skip_special_tokens=True).strip()
    from llava_tune.inference.generate import GenerationSettings, generate
    assert answer == generate(ours, [{"role": "user", "content": f"<image>\n{QUESTION}"}], [image],
                              GenerationSettings(max_new_tokens=6))
    assert model.generation_config.suppress_tokens == [image_id]
    assert json.loads((out / "config.json").read_text())["vision_feature_layer"] == -2


def test_llm_export_is_the_merged_llm(finetune_run, tmp_path):
    out = tmp_path / "llm"
    assert main(["export", str(finetune_run), str(out), "--format", "llm"]) == 0
    exported = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_run(finetune_run).model.llm
    base, _ = load_llm(load_run(finetune_run).config.model.llm)
    ids = torch.tensor([[1, 8, 20, 30, 40, 7]])
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, ours(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(exported(ids).logits, base(ids).logits, atol=1e-4)


def test_hf_llava_refuses_a_text_only_run(stage_overrides, tmp_path, capsys):
    overrides = stage_overrides("lm") + ["train.max_steps=1", "train.batch_size=2",
                                         "data.max_length=64", "train.llm=lora"]
    assert main(["train", str(REPO / "configs/demo/lm.yaml"), *overrides]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--format", "hf-llava"]) == 2
    assert "text-only run" in capsys.readouterr().err


def test_internlm2_export_runs_in_internlm2s_own_forward(finetune_run, tmp_path):
    """The internlm2 export, run by a reference InternLM2 forward written from the
    architecture (tests/test_internlm2.py), equals the llm export run by transformers."""
    from safetensors.torch import load_file
    from test_internlm2 import reference_internlm2_logits

    internlm2, llm = tmp_path / "internlm2", tmp_path / "llm"
    assert main(["export", str(finetune_run), str(internlm2), "--format", "internlm2"]) == 0
    assert main(["export", str(finetune_run), str(llm), "--format", "llm"]) == 0
    cfg = json.loads((internlm2 / "config.json").read_text())
    assert cfg["model_type"] == "internlm2" and (internlm2 / "tokenizer.model").is_file()
    ids = torch.tensor([[1, 8, 20, 30, 40, 7, 19]])
    theirs = reference_internlm2_logits(load_file(internlm2 / "model.safetensors"), cfg, ids)
    exported = LlamaForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(theirs, exported(ids).logits, atol=1e-5)
