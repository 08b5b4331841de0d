"""A config's stage resolved: how the LLM and the vision tower train, the config's own
train.llm / train.vision or else the stage's defaults (the stages themselves are data:
constants.STAGES). Applying that to a model is assembly/trainable.py."""

from __future__ import annotations

from llava_tune.config import Config
from llava_tune.constants import STAGES


def llm_mode(config: Config) -> str:
    return config.train.llm or STAGES[config.stage].llm


def vision_mode(config: Config) -> str | None:
    """How the tower trains (frozen, lora, full), or None when the stage has no tower."""
    return (config.train.vision or STAGES[config.stage].tower) if STAGES[config.stage].vision else None
