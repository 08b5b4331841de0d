"""LoRA on the vision tower: our run dir's ``vision_adapter/`` <-> XTuner's ``visual_encoder_adapter/``.

XTuner's LLaVA recipe puts a PEFT LoRA on transformers' ``CLIPVisionModel`` (every Linear:
``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``fc1``, ``fc2``). Our tower is llava-tune's
CLIP ViT with open_clip's names and attention as separate q/k/v/out Linears (models/vit.py),
so each of those LoRAs has exactly one counterpart and the conversion is a rename, tensors
untouched:

    CLIPVisionModel (XTuner)                       our tower
    [vision_model.]encoder.layers.N.self_attn.X    transformer.resblocks.N.attn.X   (X = q/k/v/out_proj)
    [vision_model.]encoder.layers.N.mlp.fc1        transformer.resblocks.N.mlp.c_fc
    [vision_model.]encoder.layers.N.mlp.fc2        transformer.resblocks.N.mlp.c_proj

Keys carry ``vision_model.`` when the adapter was saved on transformers 4 (XTuner's published
adapters) and none on transformers 5, which flattened CLIPVisionModel; both are read, and
exports write ``vision_model.`` as XTuner's own files do.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft

from llava_tune.convert.lora import (
    ADAPTER_CONFIG,
    ADAPTER_SAFE,
    Lora,
    adapter_tensors,
    lora_patterns,
    peft_adapter_config,
    read_lora_adapter,
    target_module_names,
)
from llava_tune.convert.open_clip_format import open_clip_vit_config
from llava_tune.convert.weights import save_safetensors
from llava_tune.errors import UserError

XTUNER_ADAPTER = "visual_encoder_adapter"
XTUNER_FULL = "visual_encoder"
CLIP_PREFIX = "vision_model."

_ANY_LORA = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")
_CLIP_PATH = re.compile(
    r"^(?:vision_model\.)?encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")
_OUR_PATH = re.compile(
    r"^transformer\.resblocks\.(\d+)\.(attn\.(?:q|k|v|out)_proj|mlp\.c_(?:fc|proj))$")
_TO_OURS = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
            "self_attn.v_proj": "attn.v_proj", "self_attn.out_proj": "attn.out_proj",
            "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_TO_CLIP = {ours: theirs for theirs, ours in _TO_OURS.items()}


@dataclass(frozen=True)
class TowerShape:
    """Sizes of a CLIP ViT tower, read from its config (no weights loaded)."""

    width: int
    layers: int
    mlp: int
    source: str
    """How messages name the tower (a folder or an open_clip model name)."""

    def io(self, suffix: str) -> tuple[int, int]:
        """(in, out) features of one of our module suffixes (attn.q_proj, mlp.c_fc, ...)."""
        if suffix.startswith("attn."):
            return self.width, self.width
        return (self.width, self.mlp) if suffix == "mlp.c_fc" else (self.mlp, self.width)


def tower_shape(name: str, pretrained: str | None, config_file: str | None) -> TowerShape:
    """The shape of the tower `create_open_clip(name, pretrained, config_file)` builds: from a
    Hugging Face CLIP folder's config.json, or from the open_clip model config."""
    if pretrained is not None and Path(pretrained).is_dir():
        from llava_tune.convert.open_clip import _vision_config

        cfg, _ = _vision_config(Path(pretrained))
        return TowerShape(int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]),
                          int(cfg["intermediate_size"]), f"the CLIP folder {pretrained}")
    config = open_clip_vit_config(
        name, config_file, fix="or pass the Hugging Face CLIP folder with --vision-weights")
    return TowerShape(config.width, config.layers, config.mlp_width, f"open_clip model {name!r}")


def clip_to_ours(path: str) -> str | None:
    """Our module path for a CLIPVisionModel one, or None when our tower has no such LoRA."""
    match = _CLIP_PATH.match(path)
    if match is None:
        return None
    return f"transformer.resblocks.{match.group(1)}.{_TO_OURS[match.group(2)]}"


def ours_to_clip(path: str) -> str:
    match = _OUR_PATH.match(path)
    assert match is not None, path  # our own tower's adapters only ever name these
    return f"{CLIP_PREFIX}encoder.layers.{match.group(1)}.{_TO_CLIP[match.group(2)]}"


def read_clip_adapter(folder: Path, shape: TowerShape) -> tuple[dict[str, Any], dict[str, Lora]]:
    """(adapter_config.json, our module path -> LoRA) of XTuner's visual_encoder_adapter/,
    checked against the tower: every module must exist there with the same in/out features."""
    cfg, theirs = read_lora_adapter(folder, _ANY_LORA)
    file = next((folder / n for n in (ADAPTER_SAFE, "adapter_model.bin") if (folder / n).is_file()),
                folder)
    fix = ("XTuner trained it on another CLIP tower: pass that tower's Hugging Face folder "
           "(e.g. openai/clip-vit-large-patch14-336) with --vision-weights")
    modules = {}
    for path, lora in theirs.items():
        ours = clip_to_ours(path)
        if ours is None:
            raise UserError(
                f"{file}: LoRA on {path}, which llava-tune's vision tower has no counterpart "
                f"for; only LoRAs on a CLIPVisionModel's encoder.layers.N.self_attn."
                f"{{q,k,v,out}}_proj and mlp.fc1/fc2 convert (XTuner's default targets): "
                f"train the adapter without that module in target_modules")
        layer, suffix = _OUR_PATH.match(ours).groups()
        if int(layer) >= shape.layers:
            raise UserError(f"{file}: {path} is beyond the {shape.layers} layers of "
                            f"{shape.source}; {fix}")
        found, expected = (lora.A.shape[1], lora.B.shape[0]), shape.io(suffix)
        if found != expected:
            raise UserError(f"{file}: {path} maps {found[0]} -> {found[1]} features, "
                            f"{shape.source} has {expected[0]} -> {expected[1]}; {fix}")
        modules[ours] = lora
    return cfg, modules


def write_our_adapter(folder: Path, modules: dict[str, Lora], source_cfg: dict[str, Any],
                      base: str | None) -> dict[str, Any]:
    """Write `modules` (our tower's paths) as a PEFT adapter that loads onto our tower with
    `PeftModel.from_pretrained(tower.visual, folder)`; returns r, alpha, dropout and targets
    for the run's train.vision_lora."""
    r, alpha, rank_pattern, alpha_pattern = lora_patterns(modules)
    targets = target_module_names(modules)
    dropout = float(source_cfg.get("lora_dropout", 0.0))
    folder.mkdir(parents=True, exist_ok=True)
    peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        use_rslora=bool(source_cfg.get("use_rslora")), base_model_name_or_path=base,
        inference_mode=True,
    ).save_pretrained(folder)
    save_safetensors(adapter_tensors(modules), folder / ADAPTER_SAFE)
    return {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": targets}


def write_clip_adapter(run_adapter: Path, folder: Path, base: str | None) -> None:
    """Our run's vision_adapter/ as XTuner's visual_encoder_adapter/: the same tensors under
    CLIPVisionModel's module names (`vision_model.encoder.layers.N...`), a PEFT config that
    targets q_proj/k_proj/v_proj/out_proj/fc1/fc2."""
    cfg, ours = read_lora_adapter(run_adapter, _ANY_LORA)
    for path in ours:
        if _OUR_PATH.match(path) is None:
            raise UserError(f"{run_adapter}: LoRA on {path}, which a CLIPVisionModel has no "
                            "counterpart for; XTuner's layout cannot hold this adapter")
    theirs = {ours_to_clip(path): lora for path, lora in ours.items()}
    config = peft_adapter_config(theirs, None, base, cfg.get("lora_dropout", 0.0),
                                 bool(cfg.get("use_rslora")))
    folder.mkdir()
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_safetensors(adapter_tensors(theirs), folder / ADAPTER_SAFE)


def write_clip_tower(visual, folder: Path) -> None:
    """Our ViT (our VisionTower's ``base``, no LoRA on it) as XTuner's
    ``visual_encoder/``: a CLIPVisionModel folder, config.json + model.safetensors with the
    ``vision_model.`` keys transformers 4 writes (transformers 5 reads them too)."""
    from llava_tune.convert.open_clip import hf_clip_vision_state_dict

    config, state = hf_clip_vision_state_dict(visual)
    state = {k if k.startswith(CLIP_PREFIX) else CLIP_PREFIX + k: v for k, v in state.items()}
    folder.mkdir()
    data = config.to_dict()
    data["architectures"] = ["CLIPVisionModel"]
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    save_safetensors(state, folder / "model.safetensors")
