"""Batched generation (eval) answers exactly as one conversation at a time (chat)."""

from __future__ import annotations

import json

from llava_tune.assembly.model import load_run
from llava_tune.data.image import load_image
from llava_tune.inference.generate import GenerationSettings, generate, generate_batch


def test_batched_greedy_answers_equal_one_at_a_time(tiny_finetune_run, shapes_data):
    bundle = load_run(tiny_finetune_run)
    settings = GenerationSettings(max_new_tokens=12)
    records = json.loads((shapes_data / "heldout.json").read_text())[:6]
    conversations = []
    for i, record in enumerate(records):
        question = record["conversations"][0]["value"]
        images = [load_image(shapes_data / "images" / record["image"])]
        if i % 3 == 2:  # a text-only question among them, and another length of prompt
            question, images = "Describe a red circle in a few words, please.", []
        conversations.append(([{"role": "user", "content": question}], images))
    alone = [generate(bundle, messages, images, settings) for messages, images in conversations]
    together = generate_batch(bundle, conversations, settings)
    assert together == alone
    assert len(set(alone)) > 1  # the prompts really differ in what they produce


def test_batched_generation_records_no_autograd_graph(tiny_finetune_run, shapes_data):
    """eval and MMBench call generate_batch directly: without no_grad there, the image
    features and the prompt embeddings would keep an autograd graph per batch."""
    import torch

    bundle = load_run(tiny_finetune_run)
    seen = []
    inner = bundle.model.llm.generate

    def spy(*args, **kwargs):
        seen.append((torch.is_grad_enabled(), kwargs.get("inputs_embeds")))
        return inner(*args, **kwargs)

    bundle.model.llm.generate = spy
    image = load_image(shapes_data / "images" / "heldout" / "000000.png")
    with torch.enable_grad():
        generate_batch(bundle, [([{"role": "user", "content": "<image>\nWhat color is the shape?"}],
                                [image])], GenerationSettings(max_new_tokens=2))
    assert len(seen) == 1
    grad_enabled, embeds = seen[0]
    assert not grad_enabled and (embeds is None or embeds.grad_fn is None)
