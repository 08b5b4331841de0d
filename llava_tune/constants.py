"""Values shared by every layer of llava-tune, and the allowed values of the config's
enumerated keys: config validation checks against these, and the code that acts on a value
takes it from here too."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
"""Label value that carries no loss (prompts, image slots, padding)."""

IMAGE_TOKEN = "<image>"
"""Where an image goes in a conversation's text."""

VIDEO_TOKEN = "<video>"
"""Where a video goes in a conversation's text (records only: read as an `<image>` marker
whose item is a video, see data/formats.py)."""

IMAGE_TOKEN_INDEX = -200
"""Placeholder id for one image slot in input_ids; each image fills N consecutive slots."""


# --------------------------------------------------------------------------- allowed values


TRAIN_MODES = ("frozen", "lora", "full")
"""How a part of the model trains: train.llm, train.vision."""

QUANTIZATIONS = (None, "4bit", "8bit")
"""model.quantization: full precision, NF4 (QLoRA) or LLM.int8."""

IMAGE_ASPECTS = ("pad", "anyres")
"""model.image_aspect: one padded square per image (LLaVA-1.5), or LLaVA-NeXT's tiles."""

MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
"""train.mixed_precision: auto is bf16 on GPUs that have it, fp16 on older GPUs, no on the
CPU."""


@dataclass(frozen=True)
class Stage:
    """`vision`: the stage has the vision tower and the projector (which always trains).
    `llm` / `tower`: how the LLM and the tower train (one of TRAIN_MODES) unless the config
    says otherwise."""

    name: str
    vision: bool | None
    llm: str
    tower: str = "frozen"


STAGES = {stage.name: stage for stage in (
    Stage("pretrain", vision=True, llm="frozen"),
    Stage("finetune", vision=True, llm="lora"),
    Stage("sft", vision=False, llm="lora"),
    Stage("dpo", vision=None, llm="lora"),
)}
"""Stages are data: the config's `stage` is one of these names."""


DPO_LOSSES = ("sigmoid", "ipo")
"""dpo.loss: DPO's logistic loss on the reward margin, or IPO's squared one."""

DPO_REFERENCES = ("precompute", "live")
"""dpo.reference: the reference model's log-probabilities computed once before training, or
at every step with the trained weights set back to where they started."""
