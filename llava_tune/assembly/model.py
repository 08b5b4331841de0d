"""The composed model of a config, and finished runs (or their checkpoints) loaded back."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import peft
import torch

from llava_tune import rundir
from llava_tune.assembly.llm import default_device, load_llm, quantization_config, resolve_dtype
from llava_tune.assembly.trainable import set_trainable
from llava_tune.config import Config, ModelConfig
from llava_tune.convert.hf_llava import is_hf_llava_dir, read_hf_llava
from llava_tune.convert.lora import check_adapter_folder
from llava_tune.convert.open_clip import create_open_clip
from llava_tune.convert.projector import load_projector
from llava_tune.convert.weights import load_weights
from llava_tune.data.image import ImageProcessor
from llava_tune.data.template import ChatTemplate, add_image_token, get_template
from llava_tune.errors import UserError
from llava_tune.files import read_json
from llava_tune.models.anyres import ImageLayout
from llava_tune.models.llava import LlavaModel
from llava_tune.models.projector import Projector
from llava_tune.models.vision import VisionTower
from llava_tune.stages import has_vision, llm_mode, vision_mode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class ModelBundle:
    """The composed model and what feeds it: the tokenizer, the image processor (None without
    a vision tower) and the chat template, with the config they were built from."""

    model: LlavaModel
    tokenizer: PreTrainedTokenizerBase
    image_processor: ImageProcessor | None
    template: ChatTemplate
    config: Config
    tower_changed: bool = False
    """The tower's own weights differ from the config's tower (carried over or trained
    fully), so a run must save them (vision/)."""


def build_tower(config: ModelConfig) -> VisionTower:
    """The config's vision tower (open_clip name + weights, or a Hugging Face CLIP folder),
    built by llava-tune (models/vit.py) without importing open_clip."""
    v = config.vision
    visual = create_open_clip(v.name, v.pretrained, v.config_file)
    layers = visual.vit_config.layers
    if not -layers <= v.feature_layer < layers:
        raise UserError(f"model.vision.feature_layer {v.feature_layer} is not a block of the "
                        f"{layers}-block vision tower; use one of {-layers}..{layers - 1} "
                        "(LLaVA's is -2, the penultimate)")
    return VisionTower(visual, v.feature_layer)


def image_layout(config: Config, tower: VisionTower | None = None) -> ImageLayout:
    """How the config's images and videos become tokens for `tower` (models/anyres.py);
    without a tower, the settings alone (its sizes 0), e.g. to check an export format."""
    model = config.model
    grids: tuple = ()
    if model.image_aspect == "anyres":
        limit = model.anyres.max_tiles
        grids = tuple((r, c) for r, c in model.anyres.grid_pinpoints if limit is None or r * c <= limit)
    tile, patches = (tower.image_size, tower.base.grid_size) if tower is not None else (0, 0)
    return ImageLayout(tile=tile, patches=patches, grids=grids,
                       pool_max=model.anyres.pool_max if grids else None,
                       video_frames=config.data.video_frames, video_pool=model.video_pool,
                       multi_image=model.anyres.multi_image)


def build_model(config: Config, llm_path: Path, quantization: str | None,
                device=None) -> ModelBundle:
    """The stage's parts with their base weights: the LLM from `llm_path` and, for stages with
    images, the config's vision tower and a freshly initialized projector."""
    llm, tokenizer = load_llm(llm_path, quantization=quantization, dtype=config.model.dtype,
                              device=device)
    vision = projector = processor = layout = None
    if has_vision(config):
        vision = build_tower(config.model)
        layout = image_layout(config, vision)
        projector = Projector(vision.hidden_size, llm.config.hidden_size,
                              config.model.projector_depth, newline=layout.anyres)
        device = llm.get_input_embeddings().weight.device
        vision.to(device)
        projector.to(device)
        processor = ImageProcessor(vision.image_size, vision.mean, vision.std, layout)
        add_image_token(tokenizer)
    template = get_template(config.model.template)
    if config.model.system:
        template = ChatTemplate(**{**template.__dict__, "default_system": config.model.system})
    return ModelBundle(LlavaModel(llm, vision, projector, layout), tokenizer, processor, template,
                       config)


def recorded_base(run_dir: Path, config: Config, base: str | os.PathLike | None = None) -> Path:
    """`base`, or the base LLM the run recorded, which must still exist."""
    path = Path(base or config.model.llm)
    if not path.is_dir():
        raise UserError(f"the base LLM of {run_dir} ({path}) is gone; pass its new location "
                        "with --base")
    return path


def base_llm_path(run_dir: Path, config: Config, base: str | os.PathLike | None = None) -> Path:
    """The LLM a run's weights go on: its own llm/ when the LLM was fully trained, else the
    recorded (or given) base LLM."""
    if (run_dir / rundir.LLM).is_dir():
        return run_dir / rundir.LLM
    return recorded_base(run_dir, config, base)


def load_parts(bundle: ModelBundle, run_dir: Path, parts: list[str],
               trainable: bool = False) -> None:
    """Load a run's weight folders into a model built on its base LLM: the projector, the LLM's
    LoRA, the tower's full weights and LoRA (llm/ is loaded as the base LLM itself)."""
    model = bundle.model
    for part in [p for p in rundir.WEIGHT_PARTS if p in parts]:
        folder = run_dir / part
        if part == rundir.PROJECTOR:
            if model.projector is None:
                raise UserError(f"{folder} exists, but this stage has no vision tower")
            load_projector(model.projector, folder)
        elif part == rundir.LLM_ADAPTER:
            check_adapter_folder(folder)
            model.llm = peft.PeftModel.from_pretrained(model.llm, folder, is_trainable=trainable)
        elif part == rundir.VISION_ADAPTER:
            check_adapter_folder(folder)
            model.vision.visual = peft.PeftModel.from_pretrained(model.vision.visual, folder,
                                                                 is_trainable=trainable)
        elif part == rundir.VISION:
            load_full_tower(model.vision, folder)


def load_full_tower(tower: VisionTower, folder: Path) -> None:
    """vision/model.safetensors: every weight of the tower, by our module names."""
    state = load_weights(folder / "model.safetensors")
    result = tower.base.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{folder}/model.safetensors does not fit this vision tower (missing "
                        f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); "
                        "it was trained with another model.vision")


def load_run(path: str | os.PathLike, base: str | os.PathLike | None = None,
             quantization: str | None | bool = True, device=None) -> ModelBundle:
    """A finished run, ready for inference: the composed model, tokenizer, image processor.

    `path` is a run dir (it must be complete: see rundir.check_complete) or one of its
    checkpoints (`RUN/checkpoints/step-N`, the weights as they were at that step). `base`
    replaces the recorded base LLM path (when it moved); `quantization=True` keeps the
    quantization the run trained with.
    """
    path = Path(path)
    if (path / "trainable.safetensors").is_file() and path.parent.name == rundir.CHECKPOINTS:
        return _load_checkpoint(path, base, quantization, device)
    config = rundir.read_run_config(path)
    parts = rundir.check_complete(path)
    if base is not None:
        config.model.llm = str(base)
    if quantization is True:
        quantization = config.model.quantization
    bundle = build_model(config, base_llm_path(path, config, base), quantization, device)
    load_parts(bundle, path, [p for p in parts if p != rundir.LLM])
    return for_inference(bundle)


def _load_checkpoint(path: Path, base, quantization, device) -> ModelBundle:
    """A training checkpoint: the model rebuilt as its run trained it, then every trainable
    weight from the checkpoint."""
    run_dir = path.parent.parent
    config = rundir.read_run_config(run_dir)
    if base is not None:
        config.model.llm = str(base)
    if quantization is not True and quantization != config.model.quantization:
        raise UserError("a checkpoint loads with the quantization it trained with; drop --bits")
    bundle = build_model(config, recorded_base(run_dir, config, base), config.model.quantization,
                        device)
    if config.init_from:
        carry_over(bundle, Path(config.init_from))
    set_trainable(bundle.model, config)
    state = load_weights(path / "trainable.safetensors")
    check_trainable_state(bundle.model, state, path)
    bundle.model.load_state_dict(state, strict=False)
    return for_inference(bundle)


def carry_over(bundle: ModelBundle, init_from: Path) -> list[str]:
    """Put everything the run `init_from` trained onto `bundle` (a model for the next run's
    config, before `set_trainable`); returns the parts carried.

    The projector and the tower's full weights load as they are. A LoRA keeps training when
    the new run trains that part with LoRA (with the same rank and alpha), is merged into the
    weights when it trains fully, and stays as a frozen adapter otherwise (saved again with the
    new run). init_from's llm/ must already be the new run's base LLM (model.llm). Whatever
    the new run has no place for raises UserError naming it and the fix.
    """
    config = bundle.config
    parts = rundir.check_complete(init_from)
    if rundir.LLM in parts and Path(config.model.llm).resolve() != (init_from / rundir.LLM).resolve():
        raise UserError(f"init_from {init_from} trained the full LLM ({init_from / rundir.LLM}), "
                        f"but model.llm is {config.model.llm}; its weights would be lost")
    if rundir.PROJECTOR in parts and bundle.model.projector is None:
        raise UserError(f"init_from {init_from} trained a projector, which stage {config.stage} "
                        "has no place for; use stage finetune (text-only records may be mixed "
                        "in), or start from its LLM alone (llava-tune export --format llm)")
    modes = {rundir.LLM_ADAPTER: llm_mode(config), rundir.VISION_ADAPTER: vision_mode(config)}
    loras = {rundir.LLM_ADAPTER: config.train.lora, rundir.VISION_ADAPTER: config.train.vision_lora}
    for part in (rundir.LLM_ADAPTER, rundir.VISION_ADAPTER):
        if part in parts and modes[part] == "lora":
            _check_same_lora(init_from / part, loras[part], part)
    load_parts(bundle, init_from, parts, trainable=True)
    model = bundle.model
    if rundir.LLM_ADAPTER in parts and modes[rundir.LLM_ADAPTER] == "full":
        model.llm = model.llm.merge_and_unload()
    if rundir.VISION_ADAPTER in parts and modes[rundir.VISION_ADAPTER] == "full":
        model.vision.visual = model.vision.visual.merge_and_unload()
    if rundir.VISION in parts or modes[rundir.VISION_ADAPTER] == "full":
        bundle.tower_changed = True
    return parts


def _check_same_lora(folder: Path, lora, part: str) -> None:
    saved = read_json(folder / "adapter_config.json", "adapter config")
    key = "train.lora" if part == rundir.LLM_ADAPTER else "train.vision_lora"
    if (saved.get("r"), saved.get("lora_alpha")) != (lora.r, lora.alpha):
        raise UserError(f"init_from's {folder} has r={saved.get('r')}, "
                        f"alpha={saved.get('lora_alpha')}, this run's {key} r={lora.r}, "
                        f"alpha={lora.alpha}; the adapter keeps training as it is, so set "
                        f"{key}.r={saved.get('r')} {key}.alpha={saved.get('lora_alpha')}")


def check_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor],
                          source: Path) -> None:
    """A checkpoint must hold exactly the model's trainable weights: none missing, none extra."""
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise UserError(f"checkpoint {source} does not match this model: "
                        f"{len(missing)} trainable weights missing (e.g. {missing[:2]}), "
                        f"{len(extra)} unexpected (e.g. {extra[:2]}); it was written by a run "
                        "with another config (stage, train.llm, train.vision or LoRA settings)")


def load_model(path: str | os.PathLike, base: str | os.PathLike | None = None,
               quantization: str | None | bool = True, device=None) -> ModelBundle:
    """A run dir or checkpoint (see `load_run`), an hf-llava export (see `load_hf_llava`) or a
    plain LLM folder, ready for inference."""
    path = Path(path)
    if (path / rundir.CONFIG).is_file() or (path / "trainable.safetensors").is_file():
        return load_run(path, base=base, quantization=quantization, device=device)
    check_model_folder(path)
    if is_hf_llava_dir(path):
        return for_inference(load_hf_llava(path, quantization, device))
    config = Config(stage="sft", model=ModelConfig(llm=str(path)))
    return for_inference(build_model(config, path, None if quantization is True else quantization,
                                     device))


def load_hf_llava(path: Path, quantization: str | None | bool = True, device=None) -> ModelBundle:
    """An hf-llava export (transformers Llava + AutoProcessor), in a run's shape: full
    precision unless `quantization` asks for 4 or 8 bits; InternLM2's chat template, as the
    export's processor has it."""
    device = torch.device(device) if device is not None else default_device()
    quantization = None if quantization is True else quantization
    parts = read_hf_llava(path, resolve_dtype(None, device), device,
                          quantization_config(quantization, device))
    config = Config(stage="finetune", model=ModelConfig(llm=str(path), quantization=quantization))
    return ModelBundle(LlavaModel(parts.llm, parts.vision, parts.projector, parts.layout),
                       parts.tokenizer,
                 parts.image_processor, get_template("internlm2_chat"), config)


def check_model_folder(path: Path) -> None:
    """Raise UserError saying what to pass when `path`, which holds no run, is not an LLM
    folder either: missing, or XTuner's LLaVA output (which imports as a run dir)."""
    from llava_tune.convert.xtuner import is_xtuner_dir

    if not path.exists():
        raise UserError(f"{path} not found; give a run dir, a checkpoint of one "
                        "(RUN/checkpoints/step-N) or an LLM folder")
    if is_xtuner_dir(path) and not (path / "config.json").is_file():
        raise UserError(f"{path} is XTuner's LLaVA output (projector/, llm_adapter/), not a "
                        f"run dir; make it one first: llava-tune import-xtuner {path} RUN_DIR "
                        "--llm LLM_DIR --vision-weights CLIP_DIR, then use RUN_DIR")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is neither a llava-tune run dir (config.yaml) nor an LLM "
                        "folder (config.json)")


def for_inference(bundle: ModelBundle) -> ModelBundle:
    bundle.model.eval()
    bundle.model.requires_grad_(False)
    return bundle
