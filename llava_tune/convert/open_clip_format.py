"""open_clip's own formats -> llava-tune's CLIP ViT (models/vit.py), without importing open_clip.

- Model configs: open_clip names a model by a JSON file (`ViT-L-14-336-quickgelu.json`:
  `embed_dim`, `vision_cfg` {image_size, layers, width, head_width, mlp_ratio, patch_size, ...},
  `quick_gelu`, `text_cfg`). Names are read from the installed open_clip package's
  `model_configs/` folder, found without running the package (its import costs 51 MB: timm
  and the tokenizer's tables); `model.vision.config_file` adds one JSON, named by its stem.
- Weight files: a CLIP state dict (.safetensors, or .pt/.bin read weights-only), possibly
  under `state_dict` and with `module.` prefixes (a training checkpoint); the tower's tensors
  are the `visual.*` ones, attention's in_proj [3W(, W)] split into q, k, v rows.
- Back (the demo's tower): our weights as the `visual.*` part of an open_clip state dict.

A config asking for what our ViT does not compute (layer scale, attentional pooling, a timm
or ResNet tower, ...) is refused naming the field, never approximated.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llava_tune.convert.weights import load_weights, read_safetensors, safetensors_keys
from llava_tune.errors import UserError
from llava_tune.files import read_json
from llava_tune.models.vit import OPENAI_MEAN, OPENAI_STD, ClipViT, ViTConfig, build_vit

# open_clip's CLIPVisionCfg defaults for the keys a ViT config may leave out.
_DEFAULTS: dict[str, Any] = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0,
                             "patch_size": 16, "image_size": 224}
# Keys that change nothing we compute: the pooled output's form (ours is the CLS token after
# ln_post, what "tok" pooling gives with or without final_ln_after_pool) and settings that
# only matter to a pooler or a timm tower, which are refused on their own.
_HARMLESS = {"output_tokens", "final_ln_after_pool", "attn_pooler_queries", "attn_pooler_heads",
             "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
             "timm_drop_path"}
# Keys our ViT implements only at open_clip's default value: (allowed values, why not others).
_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "ls_init_value": ((None,), "layer scale"),
    "patch_dropout": ((0, 0.0), "patch dropout (every patch must reach the LLM)"),
    "attentional_pool": ((False,), "attentional pooling"),
    "no_ln_pre": ((False,), "a ViT without ln_pre"),
    "pos_embed_type": (("learnable",), "fixed positional embeddings"),
    "pool_type": (("tok",), "pooling other than the CLS token"),
    "act_kwargs": ((None, {}), "activation arguments"),
    "block_type": ((None, "default"), "open_clip's custom blocks"),
    "qk_norm": ((False,), "q/k normalization"),
    "scaled_cosine_attn": ((False,), "scaled cosine attention"),
    "scale_heads": ((False,), "per-head scaling"),
    "scale_attn_inner": ((False,), "a norm inside attention"),
    "scale_attn": ((False,), "a norm after attention"),
    "scale_fc": ((False,), "a norm inside the MLP"),
    "timm_model_name": ((None,), "a timm tower"),
}
_KNOWN = set(_DEFAULTS) | _HARMLESS | set(_ONLY) | {"norm_kwargs"}


def _model_configs_folder() -> Path | None:
    """open_clip's model_configs/ folder, or None when open_clip is not installed. find_spec
    of a top-level package locates it without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model_configs"


def _is_model_config(data: Any) -> bool:
    return isinstance(data, dict) and "embed_dim" in data and isinstance(data.get("vision_cfg"), dict)


def read_model_config(name: str, config_file: str | None = None,
                      fix: str = "or set model.vision.config_file") -> dict[str, Any]:
    """open_clip's model config of `name`: `config_file` when its stem is `name` (it is
    registered under its stem, as open_clip.add_model_config does), else the installed open_clip's
    model_configs/{name}.json. `fix` ends the unknown-name message (how else to name a tower)."""
    if config_file is not None:
        file = Path(config_file)
        if not file.is_file():
            raise UserError(f"vision config file {config_file} not found")
        data = read_json(file, "open_clip model config")
        if not _is_model_config(data):
            raise UserError(f"vision config file {config_file} is not an open_clip model config "
                            "(a JSON object with embed_dim and vision_cfg)")
        if file.stem == name:
            return data
    folder = _model_configs_folder()
    # A name is a file's stem: one with a path separator names no file of the folder.
    file = None if folder is None or "/" in name or "\\" in name else folder / f"{name}.json"
    if file is None or not file.is_file():
        where = ("open_clip_torch, whose model_configs/ folder names them, is not installed"
                 if folder is None else f"the .json files in {folder}")
        raise UserError(f"unknown open_clip model {name!r}; use a name from "
                        f"open_clip.list_models() ({where}; OpenAI weights need the -quickgelu "
                        f"variant, e.g. ViT-L-14-336-quickgelu) {fix}")
    data = read_json(file, "open_clip model config")
    if not _is_model_config(data):
        raise UserError(f"{file} is not an open_clip model config (no embed_dim and vision_cfg)")
    return data


def _square(vision: dict[str, Any], key: str, source: str) -> int:
    """An int from an int or an [h, w] pair; our ViT takes square images and patches."""
    value = vision[key]
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise UserError(f"{source}: vision_cfg.{key} {value} is not square; llava-tune's "
                            "vision tower takes square images and patches")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{source}: vision_cfg.{key} must be a positive integer, not {value!r}")
    return value


def vit_config(model: dict[str, Any], source: str) -> ViTConfig:
    """The ViTConfig of an open_clip model config (see read_model_config); `source` names it in
    messages. Raises UserError naming the first field our ViT does not implement."""
    vision = {**_DEFAULTS, **model["vision_cfg"]}
    unknown = sorted(set(vision) - _KNOWN)
    if unknown:
        raise UserError(f"{source}: vision_cfg.{unknown[0]} is not an open_clip ViT setting "
                        f"llava-tune knows (it reads {sorted(_KNOWN)})")
    if isinstance(vision["layers"], (list, tuple)):
        raise UserError(f"{source}: vision_cfg.layers {vision['layers']} describes a ResNet "
                        "tower; llava-tune's vision tower is a CLIP ViT")
    for key, (allowed, what) in _ONLY.items():
        if key in vision and vision[key] not in allowed:
            raise UserError(f"{source}: vision_cfg.{key}={vision[key]!r} asks for {what}, which "
                            "llava-tune's ViT does not implement; use a plain CLIP ViT config "
                            f"(vision_cfg.{key} {allowed[0]!r} or left out)")
    norm = vision.get("norm_kwargs") or {}
    if set(norm) - {"eps"}:
        raise UserError(f"{source}: vision_cfg.norm_kwargs {norm} sets more than eps, which "
                        "llava-tune's ViT does not implement")
    width, head_width = vision["width"], vision["head_width"]
    for key in ("layers", "width", "head_width"):
        if not isinstance(vision[key], int) or isinstance(vision[key], bool) or vision[key] <= 0:
            raise UserError(f"{source}: vision_cfg.{key} must be a positive integer, "
                            f"not {vision[key]!r}")
    if width % head_width:
        raise UserError(f"{source}: vision_cfg.width {width} is not a multiple of head_width "
                        f"{head_width}")
    image_size, patch_size = _square(vision, "image_size", source), _square(vision, "patch_size", source)
    if patch_size > image_size:
        raise UserError(f"{source}: vision_cfg.patch_size {patch_size} exceeds image_size "
                        f"{image_size}")
    embed_dim = model["embed_dim"]
    if not isinstance(embed_dim, int) or embed_dim <= 0:
        raise UserError(f"{source}: embed_dim must be a positive integer, not {embed_dim!r}")
    return ViTConfig(
        image_size=image_size, patch_size=patch_size, width=width, layers=vision["layers"],
        heads=width // head_width,
        # open_clip sizes the MLP as int(width * mlp_ratio), truncating.
        mlp_width=int(width * float(vision["mlp_ratio"])), output_dim=embed_dim,
        quick_gelu=bool(model.get("quick_gelu", False)), eps=float(norm.get("eps", 1e-5)),
        # open_clip's preprocessing for a model name with a local weights file (only its
        # pretrained tags, which download, name others).
        mean=OPENAI_MEAN, std=OPENAI_STD,
    )


def open_clip_vit_config(name: str, config_file: str | None = None,
                         fix: str = "or set model.vision.config_file") -> ViTConfig:
    """The ViTConfig of open_clip model `name` (see read_model_config)."""
    return vit_config(read_model_config(name, config_file, fix), f"open_clip model {name!r}")


# --------------------------------------------------------------------------- weights


def _strip_module(keys: list[str]) -> bool:
    """open_clip's rule: a state dict whose first key starts with `module` was saved from a
    DistributedDataParallel model, and every key loses its first 7 characters (`module.`)."""
    return bool(keys) and keys[0].startswith("module.")


def read_visual_state(file: Path) -> dict[str, torch.Tensor]:
    """The `visual.*` tensors of an open_clip weights file, `visual.` removed (empty when it
    has none); each tensor owns its memory (none is a view of the file)."""
    if file.suffix != ".safetensors":
        state = load_weights(file, nested="state_dict")
        keys = list(state)
        cut = 7 if _strip_module(keys) else 0
        return {k[cut:].removeprefix("visual."): v for k, v in state.items()
                if k[cut:].startswith("visual.")}
    keys = safetensors_keys(file)
    cut = 7 if _strip_module(keys) else 0
    # Only the tower's tensors are read: the text tower stays on disk.
    return {k[cut:].removeprefix("visual."): v for k, v in read_safetensors(
        file, [k for k in keys if k[cut:].startswith("visual.")])}


def _resized_positions(value: torch.Tensor, grid: int) -> torch.Tensor:
    """A positional embedding [1 + g*g, W] for a grid of `grid` per side: the CLS row kept, the
    patch rows resized bicubically as an image (what open_clip does when loading weights of
    another resolution). [1 + g'*g', W] -> [1 + grid*grid, W]"""
    cls, patches = value[:1], value[1:]
    old = math.isqrt(patches.shape[0])
    image = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=True,
                          align_corners=False)
    return torch.cat([cls, image.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def visual_to_ours(visual: dict[str, torch.Tensor], model: ClipViT,
                   misfit: Callable[[str], UserError]) -> dict[str, torch.Tensor]:
    """open_clip's visual state dict (fused in_proj) -> ours (q/k/v_proj), in `model`'s dtype,
    checked against `model` (on any device, meta included). Empties `visual` as it goes (each
    tensor is freed once converted). Raises `misfit(detail)` when the tensors are not this
    model's."""
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key in list(visual):
        value = visual.pop(key)
        block, dot, part = key.rpartition(".attn.in_proj_")
        if dot and value.shape[0] % 3 == 0:  # q rows, then k, then v
            for x, piece in zip("qkv", value.chunk(3), strict=True):
                # A copy: a view would keep the fused tensor alive, and cannot be saved alone.
                state[f"{block}.attn.{x}_proj.{part}"] = piece.clone()
        else:
            state[key] = value
    pos, grid = state.get("positional_embedding"), model.grid_size
    if pos is not None and pos.ndim == 2 and pos.shape[1] == model.vit_config.width and \
            pos.shape[0] != grid * grid + 1 and math.isqrt(pos.shape[0] - 1) ** 2 == pos.shape[0] - 1:
        # Weights of another resolution: open_clip resizes the grid, and so do we.
        state["positional_embedding"] = _resized_positions(pos.float(), grid)
    missing = [f"visual.{k}" for k in expected if k not in state]
    extra = [f"visual.{k}" for k in state if k not in expected]
    if missing or extra:
        raise misfit("; ".join(
            f"{len(names)} {what}, e.g. {', '.join(names[:3])}" for names, what in (
                (missing, "tower weights missing"), (extra, "weights the tower does not have"))
            if names))
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise misfit(f"visual.{key} has shape {list(value.shape)} in the file, "
                         f"{list(expected[key].shape)} in the model")
    for key, value in state.items():
        state[key] = value.to(expected[key].dtype).contiguous()
    return state


def load_into(model: ClipViT, state: dict[str, torch.Tensor], device: torch.device) -> ClipViT:
    """Every weight of `model` (built on meta) from `state` (our names, checked): its tensors
    become the parameters (on `device`), no second copy of the tower is made."""
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    return model


def tower_from_open_clip(name: str, pretrained: str | None = None,
                         config_file: str | None = None,
                         device: torch.device | str | None = None) -> ClipViT:
    """The ViT of open_clip model `name` (see read_model_config) with the weights of the
    open_clip weights file `pretrained`, or random weights when it is None (open_clip's init).
    On the meta device (device="meta" or torch's default device), shapes only."""
    config = open_clip_vit_config(name, config_file)
    if pretrained is None:
        return build_vit(config, device)
    file = Path(pretrained)
    if not file.is_file():
        raise UserError(f"vision tower weights {pretrained} not found; set model.vision.pretrained")
    device = torch.device(device) if device is not None else torch.get_default_device()
    model = build_vit(config, "meta")

    def misfit(detail: str) -> UserError:
        return UserError(f"vision tower weights {file} do not fit open_clip model {name!r} "
                         f"({detail}); set model.vision.name (and config_file) to the model "
                         "they belong to")

    visual = read_visual_state(file)
    if not visual:
        raise misfit("no visual.* tensors: not an open_clip CLIP state dict")
    state = visual_to_ours(visual, model, misfit)
    if device.type == "meta":
        return model
    return load_into(model, state, device)


def open_clip_state_dict(model: ClipViT) -> dict[str, torch.Tensor]:
    """Our ViT's weights as the `visual.*` part of an open_clip CLIP state dict (q, k, v stacked
    into attention's in_proj), contiguous CPU copies ready for safetensors."""
    state: dict[str, torch.Tensor] = {}
    ours = model.state_dict()
    for key, value in ours.items():
        block, dot, rest = key.rpartition(".attn.")
        if dot and rest[0] in "qkv" and rest[1:].startswith("_proj."):
            if rest[0] != "q":
                continue  # stacked with q's
            part = rest.removeprefix("q_proj.")
            value = torch.cat([ours[f"{block}.attn.{x}_proj.{part}"] for x in "qkv"])
            key = f"{block}.attn.in_proj_{part}"
        state[f"visual.{key}"] = value.detach().to("cpu").contiguous().clone()
    return state
