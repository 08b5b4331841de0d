"""A config's stage applied to a model: which parts train and how (LoRA on the LLM or the
tower, or full), and the parameter counts that result."""

from __future__ import annotations

import peft
from torch import nn

from llava_tune.config import Config, LoraConfig
from llava_tune.errors import UserError
from llava_tune.models.llava import LlavaModel
from llava_tune.models.vision import VISION_LORA_TARGETS
from llava_tune.stages import llm_mode, vision_mode

_HF_CLIP_NAMES = {"fc1": "c_fc", "fc2": "c_proj"}


def lora_config(lora: LoraConfig) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, task_type="CAUSAL_LM",
    )


def vision_lora_config(lora: LoraConfig) -> peft.LoraConfig:
    """PEFT config for the tower; "all-linear" and transformers' CLIP names (fc1, fc2) become
    our module names."""
    targets = lora.target_modules
    if targets == "all-linear":
        targets = list(VISION_LORA_TARGETS)
    elif isinstance(targets, str):
        targets = [targets]
    targets = [_HF_CLIP_NAMES.get(t, t) for t in targets]
    unknown = sorted(set(targets) - set(VISION_LORA_TARGETS))
    if unknown:
        raise UserError(f"train.vision_lora.target_modules names {unknown}, which the vision "
                        f"tower does not have; use some of {list(VISION_LORA_TARGETS)}")
    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=targets)


def set_trainable(model: LlavaModel, config: Config) -> LlavaModel:
    """Freeze everything, then unfreeze what the config's stage trains: the projector, the LLM
    (lora, full) and the vision tower (lora, full).

    A part that already carries a LoRA (carried over with init_from) keeps training that LoRA
    instead of getting a fresh one.
    """
    model.requires_grad_(False)
    if model.projector is not None:
        model.projector.requires_grad_(True)
    mode = llm_mode(config)
    if mode == "lora":
        model.llm = _with_lora(model.llm, lambda: lora_config(config.train.lora))
    elif mode == "full":
        model.llm.requires_grad_(True)
    tower = vision_mode(config)
    if tower == "lora":
        model.vision.visual = _with_lora(model.vision.visual,
                                         lambda: vision_lora_config(config.train.vision_lora))
    elif tower == "full":
        model.vision.visual.requires_grad_(True)
    return model


def _with_lora(module: nn.Module, make_config) -> nn.Module:
    if isinstance(module, peft.PeftModel):
        for name, param in module.named_parameters():
            param.requires_grad_("lora_" in name)
        return module
    return peft.get_peft_model(module, make_config())


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
