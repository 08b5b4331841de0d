"""chat, eval and web take an hf-llava export folder (transformers' Llava + AutoProcessor),
loaded through transformers, and answer as the run it came from: the export holds the run's
LoRA merged into the full-precision base weights, so the reference is the run loaded in full
precision (`load_run(..., quantization=None)`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_tune.assembly.model import load_model, load_run
from llava_tune.cli import main
from llava_tune.constants import IMAGE_TOKEN_INDEX
from llava_tune.data.image import load_image
from llava_tune.inference.evaluate import evaluate
from llava_tune.inference.generate import GenerationSettings, generate
from llava_tune.inference.web import WebChat

QUESTIONS = ("What color is the shape?", "What shape is this?")
TOKENS = 12


@pytest.fixture(scope="module")
def exported(tiny_finetune_run, tmp_path_factory, cache_env) -> Path:
    out = tmp_path_factory.mktemp("hf-llava") / "hf"
    assert main(["export", str(tiny_finetune_run), str(out), "--format", "hf-llava"]) == 0
    return out


@pytest.fixture(scope="module")
def run_full(tiny_finetune_run, cache_env):
    return load_run(tiny_finetune_run, quantization=None)


@pytest.fixture(scope="module")
def images(shapes_data) -> list[Path]:
    return [shapes_data / "images" / "heldout" / f"00000{i}.png" for i in range(2)]


def expected(run_full, image: Path | None, question: str, tokens: int = TOKENS) -> str:
    content = f"<image>\n{question}" if image is not None else question
    return generate(run_full, [{"role": "user", "content": content}],
                    [load_image(image)] if image is not None else [],
                    GenerationSettings(max_new_tokens=tokens))


def next_token_logits(run_full, image: Path, question: str) -> torch.Tensor:
    """The run's logits [V] for the answer's first token, asked `question` about `image`."""
    bundle = run_full
    ids = bundle.template.prompt_ids([{"role": "user", "content": f"<image>\n{question}"}],
                                     bundle.tokenizer)
    image_id = bundle.tokenizer.convert_tokens_to_ids("<image>")
    n = bundle.model.vision.num_patches
    expanded = [t for i in ids for t in ([IMAGE_TOKEN_INDEX] * n if i == image_id else [i])]
    with torch.no_grad():
        return bundle.model.logits(torch.tensor([expanded]),
                                   bundle.image_processor(load_image(image)))[0, -1]


def test_chat_on_the_export_answers_as_the_run(exported, run_full, images, capsys):
    for image in images:
        for question in QUESTIONS:
            assert main(["chat", str(exported), "--image", str(image), "--question", question,
                         "--max-new-tokens", str(TOKENS)]) == 0
            out = capsys.readouterr().out
            assert out == expected(run_full, image, question) + "\n"
    # The image matters to the run compared against, so equal answers are no accident of an
    # answer the images cannot change (its greedy words may still coincide: 2 training steps).
    first, second = (next_token_logits(run_full, image, QUESTIONS[0]) for image in images)
    assert not torch.allclose(first, second, atol=1e-4)
    # Without an image: the text-only path of the same model.
    assert main(["chat", str(exported), "--question", QUESTIONS[0],
                 "--max-new-tokens", str(TOKENS)]) == 0
    assert capsys.readouterr().out == expected(run_full, None, QUESTIONS[0]) + "\n"


def test_eval_on_the_export_predicts_as_the_run(exported, run_full, shapes_data, tmp_path,
                                                capsys):
    data, folder = shapes_data / "heldout.json", shapes_data / "images"
    assert main(["eval", str(exported), "--data", str(data), "--image-folder", str(folder),
                 "--out", str(tmp_path / "export.jsonl"), "--max-new-tokens", "8"]) == 0
    evaluate(run_full, data, folder, GenerationSettings(max_new_tokens=8), batch_size=8,
             out=tmp_path / "run.jsonl")

    def predictions(file: Path) -> list[str]:
        return [json.loads(line)["prediction"] for line in file.read_text().splitlines()]

    assert predictions(tmp_path / "export.jsonl") == predictions(tmp_path / "run.jsonl")
    assert len(predictions(tmp_path / "run.jsonl")) >= 8


def test_web_on_the_export_answers_as_the_run(exported, run_full, images, cache_env):
    chat = WebChat(load_model(exported), settings=GenerationSettings(max_new_tokens=TOKENS))
    assert chat.has_vision
    session, taken, _ = chat.attach(None, images[0])
    assert taken
    last = list(chat.respond(session, QUESTIONS[0]))[-1]
    assert last.messages[-1]["content"] == expected(run_full, images[0], QUESTIONS[0])


def test_the_export_loads_in_4_bits_language_model_only(exported, cache_env):
    import bitsandbytes as bnb

    bundle = load_model(exported, quantization="4bit")
    kinds = {name.split(".")[0]: type(module) for name, module in bundle.model.named_modules()
             if isinstance(module, bnb.nn.Linear4bit)}
    assert set(kinds) == {"llm"}
    assert not isinstance(bundle.model.llm.lm_head, bnb.nn.Linear4bit)
