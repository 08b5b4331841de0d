"""Stages are data: which parts of the model exist and which of them train."""

from __future__ import annotations

from dataclasses import dataclass

import peft
from torch import nn

from llava_tune.config import LoraConfig
from llava_tune.models.llava import LlavaModel


@dataclass(frozen=True)
class Stage:
    """`vision`: the stage builds the vision tower (frozen) and the projector (trained).
    `llm`: how the LLM trains unless the config says otherwise (frozen, lora or full)."""

    name: str
    vision: bool
    llm: str


STAGES = {
    "pretrain": Stage("pretrain", vision=True, llm="frozen"),
    "finetune": Stage("finetune", vision=True, llm="lora"),
    "sft": Stage("sft", vision=False, llm="lora"),
}


def lora_config(lora: LoraConfig) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, task_type="CAUSAL_LM",
    )


def set_trainable(model: LlavaModel, llm_mode: str, lora: LoraConfig) -> LlavaModel:
    """Freeze everything, then unfreeze the projector and the LLM as `llm_mode` says.

    "lora" wraps the LLM in fresh LoRA adapters unless it already carries a trainable one
    (a run continued with init_from).
    """
    model.requires_grad_(False)
    if model.projector is not None:
        model.projector.requires_grad_(True)
    if llm_mode == "lora":
        if isinstance(model.llm, peft.PeftModel):
            for name, param in model.llm.named_parameters():
                param.requires_grad_("lora_" in name)
        else:
            model.llm = peft.get_peft_model(model.llm, lora_config(lora))
    elif llm_mode == "full":
        model.llm.requires_grad_(True)
    return model


def _numel(module: nn.Module | None, trainable: bool) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def parameter_counts(model: LlavaModel) -> dict[str, tuple[int, int]]:
    """component -> (trainable, total) parameter counts; 4-bit weights count packed
    (two values per stored byte), as bitsandbytes stores them."""
    return {
        name: (_numel(part, True), _numel(part, False))
        for name, part in (("vision", model.vision), ("projector", model.projector),
                           ("llm", model.llm))
        if part is not None
    }


def trainable_names(model: LlavaModel) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]
