"""Prompt building and generation, shared by `chat` and `eval`: one question, one answer."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from PIL import Image

from llava_tune.constants import IMAGE_TOKEN
from llava_tune.data.template import Message, add_image_token, expand_image_slots
from llava_tune.engine.build import Built


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


def stop_token_ids(built: Built) -> list[int]:
    """EOS and the template's end-of-turn tokens (`<|im_end|>` for InternLM2)."""
    tokenizer = built.tokenizer
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[word] for word in built.template.stop_words if word in vocab)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(
    built: Built,
    messages: list[Message],
    images: list[Image.Image] = (),
    settings: GenerationSettings | None = None,
    streamer=None,
) -> str:
    """The assistant's next answer to `messages` (the last one a user turn).

    `images` fill the `<image>` markers in order. `streamer` (a transformers streamer)
    receives tokens as they are generated.
    """
    settings = settings or GenerationSettings()
    model = built.model
    ids = built.template.prompt_ids(messages, built.tokenizer)
    pixel_values = None
    if images:
        image_id = add_image_token(built.tokenizer)
        ids, _ = expand_image_slots(ids, None, image_id, model.vision.num_patches)
        pixel_values = torch.stack([built.image_processor(image) for image in images])
    device = model.llm.get_input_embeddings().weight.device
    input_ids = torch.tensor([ids], device=device)
    embeds = model.input_embeddings(
        input_ids, None if pixel_values is None else pixel_values.to(device))
    sampling = settings.temperature > 0
    output = model.llm.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=settings.max_new_tokens,
        do_sample=sampling,
        temperature=settings.temperature if sampling else None,
        top_p=settings.top_p if sampling else None,
        top_k=settings.top_k if sampling else None,
        repetition_penalty=settings.repetition_penalty,
        eos_token_id=stop_token_ids(built),
        pad_token_id=built.tokenizer.pad_token_id,
        streamer=streamer,
    )
    return built.tokenizer.decode(output[0], skip_special_tokens=True).strip()


def normalize_answer(text: str) -> str:
    """SHAPES.md's rule: lower-case, strip white space and one final period."""
    text = text.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    return text.strip()


def strip_image_markers(text: str) -> str:
    return re.sub(rf"\s*{re.escape(IMAGE_TOKEN)}\s*", " ", text).strip()
