"""Build the composed model for a config, for training or from a finished run dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import peft
import yaml

from llava_tune.config import Config, ModelConfig, config_from_dict
from llava_tune.data.image import ImageProcessor
from llava_tune.data.template import ChatTemplate, add_image_token, get_template
from llava_tune.engine.stages import STAGES, set_trainable
from llava_tune.errors import UserError
from llava_tune.models.llava import LlavaModel
from llava_tune.models.llm import load_llm
from llava_tune.models.projector import Projector
from llava_tune.models.vision import VisionTower, create_open_clip


@dataclass
class Built:
    model: LlavaModel
    tokenizer: object
    image_processor: ImageProcessor | None
    template: ChatTemplate
    config: Config


def llm_mode(config: Config) -> str:
    return config.train.llm or STAGES[config.stage].llm


def _build(config: Config, llm_path: Path, quantization: str | None, device) -> Built:
    stage = STAGES[config.stage]
    llm, tokenizer = load_llm(llm_path, quantization=quantization, dtype=config.model.dtype,
                              device=device)
    vision = projector = processor = None
    if stage.vision:
        v = config.model.vision
        vision = VisionTower(create_open_clip(v.name, v.pretrained, v.config_file), v.feature_layer)
        projector = Projector(vision.hidden_size, llm.config.hidden_size, config.model.projector_depth)
        device = llm.get_input_embeddings().weight.device
        vision.to(device)
        projector.to(device)
        processor = ImageProcessor(vision.image_size, vision.mean, vision.std)
        add_image_token(tokenizer)
    template = get_template(config.model.template)
    if config.model.system:
        template = ChatTemplate(**{**template.__dict__, "default_system": config.model.system})
    return Built(LlavaModel(llm, vision, projector), tokenizer, processor, template, config)


def build_for_training(config: Config, device=None) -> Built:
    """The model of a run about to train: base LLM (+ init_from's projector and adapter),
    with the stage's parts set trainable."""
    built = _build(config, Path(config.model.llm), config.model.quantization, device)
    if config.init_from:
        _load_run_weights(built, Path(config.init_from), trainable=True)
    set_trainable(built.model, llm_mode(config), config.train.lora)
    return built


def read_run_config(run_dir: Path) -> Config:
    file = run_dir / "config.yaml"
    if not file.is_file():
        raise UserError(f"{run_dir} is not a llava-tune run dir: {file} is missing")
    return config_from_dict(yaml.safe_load(file.read_text(encoding="utf-8")))


def _load_run_weights(built: Built, run_dir: Path, trainable: bool = False) -> None:
    model = built.model
    if model.projector is not None and (run_dir / "projector").is_dir():
        model.projector.load(run_dir / "projector")
    if (run_dir / "llm_adapter").is_dir():
        model.llm = peft.PeftModel.from_pretrained(model.llm, run_dir / "llm_adapter",
                                                   is_trainable=trainable)


def load_run(run_dir: str | Path, base: str | Path | None = None,
             quantization: str | None | bool = True, device=None) -> Built:
    """A finished run, ready for inference: the composed model, tokenizer, image processor.

    `base` replaces the recorded base LLM path (when it moved); `quantization=True` keeps the
    quantization the run trained with.
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if base is not None:
        config.model.llm = str(base)
    if quantization is True:
        quantization = config.model.quantization
    llm_path = run_dir / "llm" if (run_dir / "llm").is_dir() else Path(config.model.llm)
    if not llm_path.is_dir():
        raise UserError(f"the base LLM of {run_dir} ({llm_path}) is gone; pass its new location "
                        "with --base")
    built = _build(config, llm_path, quantization, device)
    _load_run_weights(built, run_dir)
    return _for_inference(built)


def load_model(path: str | Path, base: str | Path | None = None,
               quantization: str | None | bool = True, device=None) -> Built:
    """A run dir (see `load_run`) or a plain LLM folder, ready for inference."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return load_run(path, base=base, quantization=quantization, device=device)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is neither a llava-tune run dir (config.yaml) nor an LLM "
                        "folder (config.json)")
    config = Config(stage="sft", model=ModelConfig(llm=str(path)))
    return _for_inference(_build(config, path, None if quantization is True else quantization,
                                 device))


def _for_inference(built: Built) -> Built:
    built.model.eval()
    built.model.requires_grad_(False)
    return built
