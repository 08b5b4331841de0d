"""The vision tower from a name (open_clip's model configs and weight files, read by
open_clip_format.py) or from a Hugging Face CLIP folder converted weight for weight, and back
to transformers' CLIP for export.

Users hold OpenAI's CLIP as a Hugging Face folder (`openai/clip-vit-large-patch14-336`:
config.json + model.safetensors or pytorch_model.bin); our tower is llava-tune's CLIP ViT
(models/vit.py), which has open_clip's `VisionTransformer` parameter names with attention's q,
k and v as separate Linears. Both compute the same network, so conversion is renaming and
transposing the output projection:

    HF CLIP vision tower                        our ViT (open_clip's names)
    embeddings.patch_embedding.weight [W,3,P,P] conv1.weight
    embeddings.class_embedding [W]              class_embedding
    embeddings.position_embedding.weight [T,W]  positional_embedding   (T = grid**2 + 1)
    pre_layrnorm.*                              ln_pre.*
    encoder.layers.i.self_attn.{q,k,v}_proj.*   transformer.resblocks.i.attn.{q,k,v}_proj.*
                                                (open_clip's own files: one fused in_proj_*)
    encoder.layers.i.self_attn.out_proj.*       transformer.resblocks.i.attn.out_proj.*
    encoder.layers.i.layer_norm{1,2}.*          transformer.resblocks.i.ln_{1,2}.*
    encoder.layers.i.mlp.fc{1,2}.*              transformer.resblocks.i.mlp.c_{fc,proj}.*
    post_layernorm.*                            ln_post.*
    visual_projection.weight [D,W] (CLIPModel)  proj [W,D]  (transposed: open_clip does x @ proj)

On disk a CLIPModel's keys (and a CLIPVisionModel's, as transformers 4 and the Hub's files
have them) carry a `vision_model.` prefix; transformers 5 flattened `CLIPVisionModel`, so its
state dict and the files it saves have none (its loader strips the prefix from older files).
Both spellings are read here.

`open_clip_from_hf_dir` reads such a folder; `hf_clip_vision_state_dict` goes back, for export
to transformers' Llava (whose vision tower is a `CLIPVisionModel`): the two directions of one
weight mapping, side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llava_tune.convert.open_clip_format import tower_from_open_clip
from llava_tune.convert.weights import (
    checkpoint_files,
    load_weights,
    read_safetensors,
    safetensors_keys,
)
from llava_tune.errors import UserError
from llava_tune.files import read_json
from llava_tune.models.vit import OPENAI_MEAN, OPENAI_STD, ClipViT, ViTConfig, build_vit

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig

_CLIP_TYPES = ("clip", "clip_vision_model")
# transformers' CLIPVisionConfig defaults, for keys an (older or trimmed) config.json leaves out.
_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
_PREFIX = "vision_model."
_TOWER_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
_PROJECTION = "visual_projection.weight"
# Keys in a CLIP checkpoint that carry no vision weights: the text tower and the contrastive
# head, plus position_ids, a buffer older transformers saved (it is just arange(T)).
_IGNORED_PREFIXES = ("text_model.", "text_projection.", "logit_scale")
_POSITION_IDS = "embeddings.position_ids"

_EXPECTED_LAYOUT = ("a Hugging Face CLIP folder: config.json with model_type 'clip' (CLIPModel) or "
                    "'clip_vision_model' (CLIPVisionModel), and model.safetensors or "
                    "pytorch_model.bin, e.g. a download of openai/clip-vit-large-patch14-336")


def _read_config(path: Path) -> dict[str, Any] | None:
    """config.json of a folder, or None when it is missing or unreadable (not a CLIP folder)."""
    try:
        return read_json(path / "config.json")
    except UserError:
        return None


def is_hf_clip_dir(path: str | Path) -> bool:
    """True when `path` is a folder whose config.json is a transformers CLIP model
    (`model_type` "clip" for CLIPModel or "clip_vision_model" for CLIPVisionModel)."""
    path = Path(path)
    if not path.is_dir():
        return False
    config = _read_config(path)
    return config is not None and config.get("model_type") in _CLIP_TYPES


def _vision_config(path: Path) -> tuple[dict[str, Any], int | None]:
    """(vision config with defaults filled in, projection dim or None) of a CLIP folder.

    A CLIPModel nests the tower's config under `vision_config` and has a projection to
    `projection_dim`; a CLIPVisionModel is the tower alone, without projection.
    """
    config = _read_config(path)
    model_type = None if config is None else config.get("model_type")
    if model_type not in _CLIP_TYPES:
        found = ("no readable config.json" if config is None
                 else f"config.json with model_type {model_type!r}")
        raise UserError(f"vision tower folder {path} is not {_EXPECTED_LAYOUT}; found {found}")
    assert config is not None
    if model_type == "clip":
        vision = dict(config.get("vision_config") or {})
        projection_dim = int(config.get("projection_dim", vision.get("projection_dim", 512)))
    else:
        vision, projection_dim = dict(config), None
    filled = {**_VISION_DEFAULTS, **{k: v for k, v in vision.items() if v is not None}}
    return filled, projection_dim


def _square(value: Any, what: str, path: Path) -> int:
    """An int from an int or a [h, w] pair; our ViT takes square images."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise UserError(f"{path}/config.json: {what} {value} is not square; only square "
                            "CLIP towers are supported")
        value = value[0]
    return int(value)


def _tower_key(key: str) -> str | None:
    """The tower-relative name of a checkpoint key (`vision_model.` stripped if present;
    `visual_projection.weight` kept), or None for a key that is not a vision weight."""
    rel = key.removeprefix(_PREFIX)
    if rel == _POSITION_IDS:
        return None
    return rel if rel.startswith(_TOWER_PARTS) or rel == _PROJECTION else None


def _load_vision_weights(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The vision tensors of a CLIP folder by tower-relative name (`embeddings.*`,
    `encoder.layers.N.*`, ..., `visual_projection.weight`), plus the names of keys that are
    neither vision nor known text/head keys (a sign of another layout)."""
    tensors: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for file in checkpoint_files(path):
        if file.suffix == ".safetensors":
            # Only the tensors asked for are read: a CLIPModel's text tower stays on disk.
            keys = safetensors_keys(file)
            tensors.update({_tower_key(k): v for k, v in read_safetensors(
                file, [k for k in keys if _tower_key(k) is not None])})
        else:
            state = load_weights(file)
            keys = list(state)
            tensors.update({rel: v for k, v in state.items() if (rel := _tower_key(k)) is not None})
        unknown += [k for k in keys if _tower_key(k) is None and not k.startswith(_IGNORED_PREFIXES)
                    and k.removeprefix(_PREFIX) != _POSITION_IDS]
    return tensors, unknown


def _hf_to_open_clip_keys(layers: int, with_projection: bool) -> dict[str, str]:
    """Our ViT's key (open_clip's names, q/k/v split: models/vit.py) -> tower-relative HF key."""
    mapping: dict[str, str] = {
        "conv1.weight": "embeddings.patch_embedding.weight",
        "class_embedding": "embeddings.class_embedding",
        "positional_embedding": "embeddings.position_embedding.weight",
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            mapping[f"{ours}.{p}"] = f"{theirs}.{p}"
    for i in range(layers):
        ours, theirs = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for p in ("weight", "bias"):
            for x in "qkv":
                mapping[f"{ours}attn.{x}_proj.{p}"] = f"{theirs}self_attn.{x}_proj.{p}"
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                         ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2")):
                mapping[f"{ours}{a}.{p}"] = f"{theirs}{b}.{p}"
    if with_projection:
        mapping["proj"] = _PROJECTION
    return mapping


def open_clip_from_hf_dir(path: str | Path, device: torch.device | str | None = None) -> ClipViT:
    """Our ViT (models/vit.py) with the weights of a Hugging Face CLIP folder.

    The folder holds config.json of a CLIPModel (`vision_config` + `projection_dim`) or a
    CLIPVisionModel, and model.safetensors or pytorch_model.bin. The tower takes pixels
    [B, 3, S, S] (S = image_size) and has `width` = hidden_size; `proj` is [width, projection_dim]
    for a CLIPModel and None for a CLIPVisionModel (which has no projection). Its mean/std are
    preprocessor_config.json's, or OpenAI's when that file is absent. Returned in eval mode with
    gradients off, on `device` (None: torch's default; on meta the weights are not read).
    Raises UserError for a folder in neither layout, missing weights or mismatched shapes.
    """
    path = Path(path)
    cfg, projection_dim = _vision_config(path)
    width, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    layers, mlp_width = int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"])
    image_size = _square(cfg["image_size"], "image_size", path)
    patch_size = _square(cfg["patch_size"], "patch_size", path)
    act = cfg["hidden_act"]
    # HF "gelu" is the exact erf GELU, as is nn.GELU(); OpenAI's weights need QuickGELU.
    if act not in ("gelu", "quick_gelu"):
        raise UserError(f"{path}/config.json: hidden_act {act!r} is not supported; expected one "
                        "of ['gelu', 'quick_gelu']")
    if heads <= 0 or width % heads or int(cfg["num_channels"]) != 3:
        raise UserError(f"{path}/config.json: expected 3 channels and hidden_size divisible by "
                        f"num_attention_heads; found {cfg['num_channels']} channels, "
                        f"hidden_size {width}, {heads} heads")
    mean, std = OPENAI_MEAN, OPENAI_STD
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        processor = read_json(pre, "image processor config")
        mean = tuple(processor.get("image_mean", mean))
        std = tuple(processor.get("image_std", std))
    config = ViTConfig(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                       heads=heads, mlp_width=mlp_width, output_dim=projection_dim,
                       quick_gelu=act == "quick_gelu", eps=float(cfg["layer_norm_eps"]),
                       mean=mean, std=std)
    visual = build_vit(config, "meta")
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type != "meta":
        _load_hf_weights(visual, path, device)
    visual.requires_grad_(False)
    return visual.eval()


def _load_hf_weights(visual: ClipViT, path: Path, device: torch.device) -> None:
    """The CLIP folder's vision weights into `visual` (built on meta), checked key by key."""
    layers = visual.vit_config.layers
    hf, unknown = _load_vision_weights(path)
    if unknown:
        raise UserError(f"{path} holds keys that are not CLIP's (e.g. {unknown[:3]}); expected "
                        f"{_EXPECTED_LAYOUT} with keys vision_model.* (or embeddings.*, "
                        "encoder.* ... as transformers 5 saves a CLIPVisionModel)")
    mapping = _hf_to_open_clip_keys(layers, visual.proj is not None)
    needed = set(mapping.values())
    missing = sorted(needed - set(hf))
    if missing:
        raise UserError(f"{path}: {len(missing)} vision weights missing for the "
                        f"{layers}-layer tower its config.json describes, e.g. {missing[:3]}")
    extra = sorted(set(hf) - needed)
    if extra:
        raise UserError(f"{path}: weights beyond the {layers}-layer tower its config.json "
                        f"describes, e.g. {extra[:3]}; config.json and weights disagree")

    ours = visual.state_dict()  # meta tensors: the shapes
    state: dict[str, torch.Tensor] = {}
    for key, source in mapping.items():
        value = hf[source]
        if key == "proj":
            value = value.T  # nn.Linear weight [out, in]; open_clip computes x @ proj [in, out]
        if value.shape != ours[key].shape:
            raise UserError(f"{path}: {source} has shape {tuple(value.shape)}, but the tower its "
                            f"config.json describes expects {tuple(ours[key].shape)} for {key}")
        state[key] = value.to(device, ours[key].dtype).contiguous()
    # The loaded tensors become the parameters: no second copy of the tower.
    visual.load_state_dict(state, strict=True, assign=True)


def hf_clip_vision_state_dict(
        visual: ClipViT) -> tuple[CLIPVisionConfig, dict[str, torch.Tensor]]:
    """Our ViT (models/vit.py, no LoRA on it) as a transformers `CLIPVisionModel`:
    (config, state dict).

    Keys are exactly those of the installed transformers' `CLIPVisionModel(config).state_dict()`,
    so a strict `load_state_dict` works: `embeddings.*`, `pre_layrnorm.*`, `encoder.layers.N.*`,
    `post_layernorm.*` in transformers 5 (which flattened the class), `vision_model.` + those in
    transformers 4. A transformers-5 `LlavaForConditionalGeneration` holds the tower at
    `model.vision_tower` (keys `model.vision_tower.embeddings...`); the caller adds that prefix
    or loads into `model.model.vision_tower` directly. Tensors are copies
    (contiguous, safe to save). `proj` is dropped: a CLIPVisionModel has no projection, and Llava
    reads hidden states. hidden_act is "quick_gelu" when the tower uses QuickGELU, else "gelu".
    Every ViT llava-tune builds is one a CLIPVisionModel expresses: the readers of open_clip
    configs refuse the rest (layer scale, attentional pooling, ...) before it is built.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    assert isinstance(visual, ClipViT), type(visual)  # a PEFT wrapper is merged or unwrapped first
    cfg = visual.vit_config
    config = CLIPVisionConfig(
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="quick_gelu" if cfg.quick_gelu else "gelu",
        layer_norm_eps=cfg.eps,
        # Informational only (CLIPVisionModel has no projection); keeps the CLIP head's size.
        projection_dim=cfg.output_dim or cfg.width,
    )

    ours = visual.state_dict()
    state = {target: ours[key].detach().clone().contiguous()
             for key, target in _hf_to_open_clip_keys(cfg.layers, False).items()}

    # Whether the keys need `vision_model.` depends on the transformers version; ask the class
    # itself, built on the meta device (no memory, no init cost).
    with torch.device("meta"):
        expected = set(CLIPVisionModel(config).state_dict())
    if set(state) != expected:
        state = {_PREFIX + k: v for k, v in state.items()}
    assert set(state) == expected, sorted(expected ^ set(state))[:5]
    return config, state


def create_open_clip(name: str, pretrained: str | None = None, config_file: str | None = None,
                     device: torch.device | str | None = None) -> ClipViT:
    """The vision tower as llava-tune builds it (models/vit.py), frozen and in eval mode.

    `name` is an open_clip model name and `pretrained` a local open_clip weights file (None:
    random init as open_clip's, for tests and the demo), or `pretrained` is a Hugging Face CLIP
    folder (e.g. a download of openai/clip-vit-large-patch14-336) whose own config.json defines
    the tower, so `name` and `config_file` are then ignored. `config_file` adds an open_clip
    model config JSON, named after the file's stem. `device` None: torch's default device; on
    the meta device the tower is shapes only. open_clip itself is never imported.
    """
    if pretrained is not None and Path(pretrained).is_dir():
        # Any folder goes here: one in neither layout gets an error describing the HF layout.
        return open_clip_from_hf_dir(pretrained, device)
    visual = tower_from_open_clip(name, pretrained, config_file, device)
    visual.requires_grad_(False)
    return visual.eval()
