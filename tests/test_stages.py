"""Stages are data: the exact set of trainable parameters each stage (and train.llm) gives."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import peft
import pytest
import torch
from torch import nn

from llava_tune.assembly.trainable import parameter_counts, trainable_names
from llava_tune.config import load_config
from llava_tune.stages import llm_mode
from llava_tune.training.setup import build_for_training

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
LAYERS = 2  # conftest's TINY_LM
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTOR = {"projector.model.0.weight", "projector.model.0.bias",
             "projector.model.2.weight", "projector.model.2.bias"}
PEFT_PREFIX = "llm.base_model.model."


def build(stage_overrides, stage_file: str, *extra: str):
    config = load_config(DEMO / f"{stage_file}.yaml", stage_overrides(stage_file) + list(extra))
    return build_for_training(config, device="cpu")[0]


def linear_names(modules=ATTENTION + MLP) -> list[str]:
    """Module paths (inside the Llama) of the LLM's linears, lm_head excluded."""
    return [f"model.layers.{i}.{'self_attn' if m in ATTENTION else 'mlp'}.{m}"
            for i in range(LAYERS) for m in modules]


def lora_names(modules=ATTENTION + MLP) -> set[str]:
    return {f"{PEFT_PREFIX}{name}.lora_{ab}.default.weight"
            for name in linear_names(modules) for ab in "AB"}


def trainable(bundle) -> set[str]:
    names = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert names == set(trainable_names(bundle.model))
    return names


def test_pretrain_trains_only_the_projector(stage_overrides):
    bundle = build(stage_overrides, "pretrain")
    assert llm_mode(bundle.config) == "frozen"
    assert trainable(bundle) == PROJECTOR
    assert not isinstance(bundle.model.llm, peft.PeftModel)
    assert bundle.model.vision is not None and not bundle.model.vision.training
    counts = parameter_counts(bundle.model)
    projector_size = 64 * 64 + 64 + 64 * 64 + 64
    assert counts["projector"] == (projector_size, projector_size)
    assert counts["vision"][0] == 0 and counts["llm"][0] == 0
    assert counts["vision"][1] > 0 and counts["llm"][1] > 0


def test_pretrain_on_a_4bit_llm_trains_only_the_projector(stage_overrides):
    bundle = build(stage_overrides, "pretrain", "model.quantization=4bit")
    assert trainable(bundle) == PROJECTOR
    q_proj = bundle.model.llm.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)


def test_finetune_qlora_trains_projector_and_lora_on_every_linear(stage_overrides):
    bundle = build(stage_overrides, "finetune", "init_from=null")
    assert bundle.config.model.quantization == "4bit"
    assert llm_mode(bundle.config) == "lora"
    names = trainable(bundle)
    assert names == PROJECTOR | lora_names()
    assert not any("lm_head" in n or "embed_tokens" in n or "vision" in n for n in names)

    llm = bundle.model.llm
    assert isinstance(llm, peft.PeftModel)
    modules = dict(llm.named_modules())
    for name in linear_names():
        wrapped = modules[f"base_model.model.{name}"]
        assert isinstance(wrapped.base_layer, bnb.nn.Linear4bit), name
        assert not wrapped.base_layer.weight.requires_grad
        assert wrapped.r["default"] == 16
    # The LM head stays a plain, frozen, full-precision linear.
    lm_head = modules["base_model.model.lm_head"]
    assert type(lm_head) is nn.Linear and not lm_head.weight.requires_grad
    # The config's rank reaches the adapters.
    lora_a = modules[f"base_model.model.{linear_names()[0]}"].lora_A["default"]
    assert lora_a.weight.shape == (16, 64)


def test_sft_full_trains_every_llm_parameter(stage_overrides):
    bundle = build(stage_overrides, "lm")
    assert bundle.config.stage == "sft" and llm_mode(bundle.config) == "full"
    assert bundle.model.vision is None and bundle.model.projector is None
    assert bundle.image_processor is None
    all_llm = {f"llm.{n}" for n, _ in bundle.model.llm.named_parameters()}
    assert trainable(bundle) == all_llm
    assert {n for n, _ in bundle.model.named_parameters()} == all_llm
    assert "llm.lm_head.weight" in all_llm and "llm.model.embed_tokens.weight" in all_llm
    assert not isinstance(bundle.model.llm, peft.PeftModel)


def test_sft_lora_trains_only_lora(stage_overrides):
    bundle = build(stage_overrides, "lm", "train.llm=lora", "train.lora.r=4")
    names = trainable(bundle)
    assert names == lora_names()
    modules = dict(bundle.model.llm.named_modules())
    base = modules[f"base_model.model.{linear_names()[0]}"].base_layer
    assert type(base) is nn.Linear and base.weight.dtype == torch.float32
    assert modules[f"base_model.model.{linear_names()[0]}"].lora_A["default"].weight.shape == (4, 64)


def test_sft_lora_on_chosen_modules(stage_overrides):
    bundle = build(stage_overrides, "lm", "train.llm=lora",
                   "train.lora.target_modules=[q_proj, v_proj]")
    assert trainable(bundle) == lora_names(("q_proj", "v_proj"))


def test_sft_qlora_trains_only_lora(stage_overrides):
    bundle = build(stage_overrides, "lm", "train.llm=lora", "model.quantization=4bit")
    assert trainable(bundle) == lora_names()
    modules = dict(bundle.model.llm.named_modules())
    assert isinstance(modules[f"base_model.model.{linear_names()[-1]}"].base_layer,
                      bnb.nn.Linear4bit)


@pytest.mark.parametrize("stage_file", ["pretrain", "lm"])
def test_frozen_llm_in_a_text_stage_has_nothing_to_train(stage_file, stage_overrides):
    """sft with a frozen LLM trains nothing; pretrain with a frozen LLM still has its projector."""
    bundle = build(stage_overrides, stage_file, "train.llm=frozen")
    assert trainable(bundle) == (PROJECTOR if stage_file == "pretrain" else set())
