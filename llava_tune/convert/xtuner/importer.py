"""XTuner's LLaVA folder -> a llava-tune run dir (`llava-tune import-xtuner`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import peft

from llava_tune import rundir
from llava_tune.config import (
    Config,
    LoraConfig,
    ModelConfig,
    TrainConfig,
    VisionConfig,
    config_to_yaml,
)
from llava_tune.convert.internlm2 import (
    split_wqkv,
)
from llava_tune.convert.lora import (
    ADAPTER_CONFIG,
    ADAPTER_SAFE,
    Lora,
    adapter_tensors,
    lora_patterns,
    read_lora_adapter,
    target_module_names,
)
from llava_tune.convert.projector import read_projector_state, write_projector_state
from llava_tune.convert.vision_lora import (
    XTUNER_ADAPTER,
    XTUNER_FULL,
    read_clip_adapter,
    tower_shape,
    write_our_adapter,
)
from llava_tune.convert.weights import save_safetensors
from llava_tune.convert.xtuner.config_file import FILE as XTUNER_CONFIG
from llava_tune.convert.xtuner.config_file import read_xtuner_config
from llava_tune.convert.xtuner.layout import (
    ADAPTER,
    LAYER,
    PROJECTOR,
    QKV,
    RENAMES,
    XT_KEY,
    llm_shape,
    xtuner_io,
)
from llava_tune.data.template import TEMPLATES
from llava_tune.errors import UserError
from llava_tune.files import atomic_dir

# --------------------------------------------------------------------------- import


def _to_ours(modules: dict[str, Lora], shape: dict[str, int]) -> dict[str, Lora]:
    """InternLM2 LoRAs -> Llama LoRAs: wqkv's B split by rows like the base weight, A shared."""
    out = {}
    counts = (shape["kv"], shape["groups"], shape["head_dim"])
    for path, lora in modules.items():
        if path == "output":
            out["lm_head"] = lora
            continue
        layer, suffix = LAYER.match(path).groups()
        prefix = f"model.layers.{layer}."
        if suffix == "attention.wqkv":
            for proj, b in zip(QKV, split_wqkv(lora.B, *counts), strict=True):
                out[prefix + proj] = Lora(lora.A, b, lora.alpha)
        else:
            out[prefix + RENAMES[suffix]] = lora
    return out


def _check_adapter_shapes(modules: dict[str, Lora], shape: dict[str, int], llm: Path,
                          file: Path) -> None:
    for path, lora in modules.items():
        io = xtuner_io(path, shape)
        if io is None:
            raise UserError(f"{file}: {path} is beyond the {shape['layers']} layers of the base "
                            f"LLM {llm}; the adapter was trained on another LLM")
        found = (lora.A.shape[1], lora.B.shape[0])
        if found != io:
            raise UserError(f"{file}: {path} maps {found[0]} -> {found[1]} features, the base "
                            f"LLM {llm} has {io[0]} -> {io[1]}; the adapter was trained on "
                            "another LLM")


def is_xtuner_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return ((path / PROJECTOR).is_dir() or (path / ADAPTER / ADAPTER_CONFIG).is_file()
            or (path / XTUNER_ADAPTER / ADAPTER_CONFIG).is_file())


def _from_xtuner_config(xtuner_dir: Path, feature_layer: int | None,
                        note: Callable[[str], None]) -> tuple[int, str | None, int | None, str]:
    """(feature layer, template, projector depth, the tower it names) from xtuner_config.py
    when the folder has one (read as text, never executed); reports what it took."""
    file = xtuner_dir / XTUNER_CONFIG
    if not file.is_file():
        return (-2 if feature_layer is None else feature_layer), None, None, ""
    settings = read_xtuner_config(file)
    if settings.token_merge_ratio not in (None, 1):
        raise UserError(f"{file}: model.token_merge_ratio={settings.token_merge_ratio}; "
                        "llava-tune feeds every patch token to the projector (ratio 1) and "
                        "cannot run this model")
    taken, defaults = [], []
    template = settings.template
    if template is not None:
        if template not in TEMPLATES:
            raise UserError(f"{file}: prompt_template is XTuner's {template}; llava-tune's "
                            f"templates are {', '.join(TEMPLATES)}, so it cannot chat in the "
                            "format this model was trained on")
        taken.append(f"template {template} (prompt_template)")
    layer = settings.visual_select_layer
    if layer is not None:
        if layer == 0:
            raise UserError(f"{file}: model.visual_select_layer=0 selects the patch embeddings, "
                            "not a transformer block; llava-tune cannot import this model")
        # XTuner indexes transformers' hidden_states (embeddings first): hidden_states[k] is
        # the output of block k - 1; negative indices are the same block in both.
        ours = layer if layer < 0 else layer - 1
        if feature_layer is None:
            feature_layer = ours
            taken.append(f"feature layer {ours} (model.visual_select_layer={layer})")
        elif feature_layer != ours:
            note(f"--feature-layer {feature_layer} replaces {file.name}'s "
                 f"model.visual_select_layer={layer}")
    else:
        defaults.append("visual_select_layer -2")
    if settings.projector_depth is not None:
        taken.append(f"projector depth {settings.projector_depth} (model.projector_depth)")
    else:
        defaults.append("projector_depth 2")
    if taken:
        note(f"from {file}: " + "; ".join(taken))
    if defaults:
        note(f"{file} leaves XTuner's defaults: " + ", ".join(defaults))
    tower = f" (its {file.name} names {settings.visual_encoder})" if settings.visual_encoder else ""
    return (-2 if feature_layer is None else feature_layer), template, settings.projector_depth, tower


def _check_tower_args(xtuner_dir: Path, vision_pretrained: str | None, tower_hint: str) -> None:
    full = xtuner_dir / XTUNER_FULL
    given = Path(vision_pretrained) if vision_pretrained is not None else None
    if full.is_dir() and (given is None or (given.is_dir() and given.resolve() != full.resolve())):
        raise UserError(f"{full} holds XTuner's fully trained vision tower, which this import "
                        f"would leave out; pass it as the tower: --vision-weights {full}")
    if given is None:
        raise UserError(f"{xtuner_dir} needs the vision tower XTuner trained with{tower_hint}: "
                        "pass its Hugging Face CLIP folder (e.g. a download of "
                        "openai/clip-vit-large-patch14-336) with --vision-weights")
    if not given.exists():
        raise UserError(f"vision tower {given} not found; --vision-weights takes a Hugging Face "
                        "CLIP folder or an open_clip weights file")


def import_xtuner(xtuner_dir: str | os.PathLike, run_dir: str | os.PathLike,
                  llm: str | os.PathLike, vision_name: str,
                  vision_pretrained: str | None = None, vision_config_file: str | None = None,
                  feature_layer: int | None = None,
                  on_note: Callable[[str], None] | None = None) -> Path:
    """Write XTuner's LLaVA artifact in ``xtuner_dir`` as an equivalent llava-tune run dir.

    ``xtuner_dir`` holds ``projector/``, ``llm_adapter/`` and ``visual_encoder_adapter/`` (what
    XTuner's ``pth_to_hf`` writes for LLaVA; any of them may be missing), maybe
    ``xtuner_config.py``. ``llm`` is the base InternLM2 folder the adapter was trained on.
    ``vision_pretrained`` is the tower XTuner trained with: its Hugging Face CLIP folder (e.g.
    openai/clip-vit-large-patch14-336, which then defines the tower; ``vision_name`` is
    ignored) or an open_clip weights file for the open_clip model ``vision_name`` (OpenAI's
    ViT-L/14-336 is ``ViT-L-14-336-quickgelu``); a ``visual_encoder/`` (fully trained tower)
    must be given here itself.

    The run dir gets:
    - ``projector/``: the tensors as saved (zero biases when saved without), after checking
      their shapes fit the tower's width and the LLM's hidden size.
    - ``llm_adapter/``: the LoRA on our Llama names. ``wqkv``'s LoRA becomes q/k/v_proj LoRAs
      sharing its ``lora_A`` with ``lora_B`` split by rows exactly like the base ``wqkv``;
      wo -> o_proj, w1 -> gate_proj, w3 -> up_proj, w2 -> down_proj, output -> lm_head. Rank,
      alpha (and rank/alpha patterns), dropout and rsLoRA are kept, so the model is the same
      function. ``base_model_name_or_path`` is ``llm``.
    - ``vision_adapter/``: ``visual_encoder_adapter/`` on our tower's module names (a rename:
      see convert/vision_lora.py), tensors, ranks, alphas and dropout unchanged.
    - ``config.yaml``: a finetune-stage config (pretrain without adapters) on ``llm``,
      unquantized, with these vision settings and the adapters' r/alpha/dropout
      (train.vision=lora with a vision adapter).

    ``xtuner_config.py`` is read as text (never executed): ``model.visual_select_layer`` sets
    the feature layer unless ``feature_layer`` is given, ``prompt_template`` must be one of our
    templates, ``model.projector_depth`` must agree with ``projector/``; ``on_note`` is told
    which values were taken. ``run_dir`` must not exist or be empty; it appears complete or not
    at all. Raises UserError, before writing anything, for a folder that is not an XTuner
    artifact, shapes that do not fit, modules our model does not have, or adapter features
    (DoRA, trained biases, modules_to_save) that have no equivalent here.
    """
    xtuner_dir, run_dir, llm = Path(xtuner_dir), Path(run_dir), Path(llm)
    note = on_note or (lambda message: None)
    if not xtuner_dir.is_dir() or not is_xtuner_dir(xtuner_dir):
        raise UserError(f"{xtuner_dir} is not an XTuner LLaVA artifact: expected {PROJECTOR}/, "
                        f"{ADAPTER}/{ADAPTER_CONFIG} and/or {XTUNER_ADAPTER}/ in it (what "
                        "xtuner convert pth_to_hf writes)")
    if (xtuner_dir / "llm").is_dir():
        raise UserError(f"{xtuner_dir} has a fully trained llm/; import handles LoRA adapters "
                        "(llm_adapter/) only")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UserError(f"{run_dir} already exists and is not empty; choose a new run dir")
    feature_layer, template, config_depth, tower_hint = _from_xtuner_config(
        xtuner_dir, feature_layer, note)
    _check_tower_args(xtuner_dir, vision_pretrained, tower_hint)
    shape = llm_shape(llm)
    tower = tower_shape(vision_name, vision_pretrained, vision_config_file)
    width = tower.width

    projector = depth = None
    if (xtuner_dir / PROJECTOR).is_dir():
        what = (f"vision tower {tower.source} (width {width}) and LLM {llm} "
                f"(hidden size {shape['hidden']})")
        projector, depth = read_projector_state(xtuner_dir / PROJECTOR, width, shape["hidden"], what)
        if config_depth is not None and config_depth != depth:
            raise UserError(f"{xtuner_dir / XTUNER_CONFIG} says model.projector_depth="
                            f"{config_depth}, but {xtuner_dir / PROJECTOR} has {depth} layers; "
                            "the folder mixes two trainings: copy the projector and the config "
                            "from the same one")

    adapter_cfg, modules = {}, {}
    if (xtuner_dir / ADAPTER).is_dir():
        adapter_cfg, theirs = read_lora_adapter(xtuner_dir / ADAPTER, XT_KEY)
        _check_adapter_shapes(theirs, shape, llm, xtuner_dir / ADAPTER)
        modules = _to_ours(theirs, shape)
    vision_cfg, vision_modules = {}, {}
    if (xtuner_dir / XTUNER_ADAPTER).is_dir():
        vision_cfg, vision_modules = read_clip_adapter(xtuner_dir / XTUNER_ADAPTER, tower)

    def absolute(path):
        return str(Path(path).resolve()) if path is not None else None

    vision = VisionConfig(name=vision_name, pretrained=absolute(vision_pretrained),
                          config_file=absolute(vision_config_file), feature_layer=feature_layer)
    train = TrainConfig(llm="frozen")
    if modules:
        r, alpha, rank_pattern, alpha_pattern = lora_patterns(modules)
        targets = target_module_names(modules)
        dropout = float(adapter_cfg.get("lora_dropout", 0.0))
        train = TrainConfig(llm="lora", lora=LoraConfig(r=r, alpha=int(round(alpha)),
                                                        dropout=dropout, target_modules=targets))
    if vision_modules:
        vr, valpha, _, _ = lora_patterns(vision_modules)
        train.vision = "lora"
        train.vision_lora = LoraConfig(
            r=vr, alpha=int(round(valpha)), dropout=float(vision_cfg.get("lora_dropout", 0.0)),
            target_modules=target_module_names(vision_modules))
    config = Config(stage="finetune" if modules or vision_modules else "pretrain",
                    run_dir=absolute(run_dir),
                    model=ModelConfig(llm=absolute(llm), quantization=None, vision=vision,
                                      projector_depth=depth or config_depth or 2,
                                      template=template or ModelConfig().template),
                    train=train)
    parts = ([rundir.PROJECTOR] if projector is not None else []) + (
        [rundir.LLM_ADAPTER] if modules else []) + (
        [rundir.VISION_ADAPTER] if vision_modules else [])
    with atomic_dir(run_dir) as tmp:
        if projector is not None:
            write_projector_state(tmp / PROJECTOR, projector, width, shape["hidden"], depth)
        if modules:
            (tmp / ADAPTER).mkdir()
            peft.LoraConfig(
                r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                use_rslora=bool(adapter_cfg.get("use_rslora")), task_type="CAUSAL_LM",
                base_model_name_or_path=absolute(llm), inference_mode=True,
            ).save_pretrained(tmp / ADAPTER)
            save_safetensors(adapter_tensors(modules), tmp / ADAPTER / ADAPTER_SAFE)
        if vision_modules:
            write_our_adapter(tmp / rundir.VISION_ADAPTER, vision_modules, vision_cfg,
                              absolute(vision_pretrained))
        (tmp / rundir.CONFIG).write_text(config_to_yaml(config), encoding="utf-8")
        rundir.mark_complete(tmp, parts, steps=0)
    return run_dir


