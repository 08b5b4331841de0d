"""A config's stage resolved: whether the model has the vision tower and projector, how the
LLM and the tower train, the config's own model.images / train.llm / train.vision or else the
stage's defaults (the stages themselves are data: constants.STAGES). Applying that to a model
is assembly/trainable.py."""

from __future__ import annotations

from pathlib import Path

from llava_tune import rundir
from llava_tune.config import Config
from llava_tune.constants import STAGES


def has_vision(config: Config) -> bool:
    """Whether the model has the vision tower and the projector: the stage's answer, or for
    dpo (either) model.images, else its init_from run's (a run with a projector), else yes."""
    stage = STAGES[config.stage].vision
    if stage is not None:
        return stage
    if config.model.images is not None:
        return config.model.images
    if config.init_from:
        return (Path(config.init_from) / rundir.PROJECTOR).is_dir()
    return True


def llm_mode(config: Config) -> str:
    return config.train.llm or STAGES[config.stage].llm


def vision_mode(config: Config) -> str | None:
    """How the tower trains (frozen, lora, full), or None when the model has no tower."""
    return (config.train.vision or STAGES[config.stage].tower) if has_vision(config) else None
