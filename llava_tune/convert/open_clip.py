"""open_clip vision towers: created from a name (+ weights file), or from a Hugging Face CLIP
folder converted weight for weight, and back to transformers' CLIP for export.

Users hold OpenAI's CLIP as a Hugging Face folder (`openai/clip-vit-large-patch14-336`:
config.json + model.safetensors or pytorch_model.bin); our tower is open_clip's
`VisionTransformer`. Both compute the same network, so conversion is renaming, fusing q/k/v
into one in-projection and transposing the output projection:

    HF CLIP vision tower                        open_clip VisionTransformer
    embeddings.patch_embedding.weight [W,3,P,P] conv1.weight
    embeddings.class_embedding [W]              class_embedding
    embeddings.position_embedding.weight [T,W]  positional_embedding   (T = grid**2 + 1)
    pre_layrnorm.*                              ln_pre.*
    encoder.layers.i.self_attn.{q,k,v}_proj.*   transformer.resblocks.i.attn.in_proj_*  (q;k;v rows)
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
to transformers' Llava (whose vision tower is a `CLIPVisionModel`).

(Over 400 lines on purpose: the two directions of one weight mapping, HF CLIP <-> open_clip,
read best side by side.)
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llava_tune.convert.weights import checkpoint_files, load_weights, open_safetensors
from llava_tune.errors import UserError
from llava_tune.files import read_json

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig

# OpenAI's normalization; HF folders usually repeat it in preprocessor_config.json.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

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
    """An int from an int or a [h, w] pair; open_clip's tower here assumes square images."""
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
            with open_safetensors(file) as f:
                keys = list(f.keys())
                tensors.update({rel: f.get_tensor(k) for k in keys
                                if (rel := _tower_key(k)) is not None})
        else:
            state = load_weights(file)
            keys = list(state)
            tensors.update({rel: v for k, v in state.items() if (rel := _tower_key(k)) is not None})
        unknown += [k for k in keys if _tower_key(k) is None and not k.startswith(_IGNORED_PREFIXES)
                    and k.removeprefix(_PREFIX) != _POSITION_IDS]
    return tensors, unknown


def _hf_to_open_clip_keys(layers: int, with_projection: bool,
                          split_qkv: bool = False) -> dict[str, str | tuple[str, ...]]:
    """open_clip key -> tower-relative HF key (or the q, k, v keys fused into its in_proj, in
    order). `split_qkv`: the tower's attention has separate q/k/v_proj (models/vision.py)."""
    mapping: dict[str, str | tuple[str, ...]] = {
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
            if split_qkv:
                for x in "qkv":
                    mapping[f"{ours}attn.{x}_proj.{p}"] = f"{theirs}self_attn.{x}_proj.{p}"
            else:
                mapping[f"{ours}attn.in_proj_{p}"] = tuple(
                    f"{theirs}self_attn.{x}_proj.{p}" for x in "qkv")
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                         ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2")):
                mapping[f"{ours}{a}.{p}"] = f"{theirs}{b}.{p}"
    if with_projection:
        mapping["proj"] = _PROJECTION
    return mapping


def open_clip_from_hf_dir(path: str | Path) -> nn.Module:
    """An open_clip `VisionTransformer` with the weights of a Hugging Face CLIP folder.

    The folder holds config.json of a CLIPModel (`vision_config` + `projection_dim`) or a
    CLIPVisionModel, and model.safetensors or pytorch_model.bin. The tower takes pixels
    [B, 3, S, S] (S = image_size) and has `width` = hidden_size; `proj` is [width, projection_dim]
    for a CLIPModel and None for a CLIPVisionModel (which has no projection). Its
    `preprocess_cfg` carries image size and the mean/std from preprocessor_config.json, or
    OpenAI's when that file is absent. Returned in eval mode with gradients off.
    Raises UserError for a folder in neither layout, missing weights or mismatched shapes.
    """
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer

    path = Path(path)
    cfg, projection_dim = _vision_config(path)
    width, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    layers, mlp_width = int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"])
    image_size = _square(cfg["image_size"], "image_size", path)
    patch_size = _square(cfg["patch_size"], "patch_size", path)
    act = cfg["hidden_act"]
    # HF "gelu" is the exact erf GELU, as is nn.GELU(); OpenAI's weights need QuickGELU.
    act_layers: dict[str, type[nn.Module]] = {"quick_gelu": QuickGELU, "gelu": nn.GELU}
    if act not in act_layers:
        raise UserError(f"{path}/config.json: hidden_act {act!r} is not supported; expected one "
                        f"of {sorted(act_layers)}")
    if width % heads or int(cfg["num_channels"]) != 3:
        raise UserError(f"{path}/config.json: expected 3 channels and hidden_size divisible by "
                        f"num_attention_heads; found {cfg['num_channels']} channels, "
                        f"hidden_size {width}, {heads} heads")
    # open_clip's LayerNorm (casts back to the input dtype) with the checkpoint's eps.
    eps = float(cfg["layer_norm_eps"])

    visual = VisionTransformer(
        image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads,
        # open_clip sizes the MLP as int(width * mlp_ratio); a ratio of the two ints is exact.
        mlp_ratio=mlp_width / width,
        output_dim=projection_dim or width, act_layer=act_layers[act],
        norm_layer=partial(LayerNorm, eps=eps),
    )
    if projection_dim is None:
        # A CLIPVisionModel has no projection; open_clip skips `proj` when it is None.
        visual.proj = None
    assert visual.transformer.resblocks[0].mlp.c_fc.out_features == mlp_width

    hf, unknown = _load_vision_weights(path)
    if unknown:
        raise UserError(f"{path} holds keys that are not CLIP's (e.g. {unknown[:3]}); expected "
                        f"{_EXPECTED_LAYOUT} with keys vision_model.* (or embeddings.*, "
                        "encoder.* ... as transformers 5 saves a CLIPVisionModel)")
    mapping = _hf_to_open_clip_keys(layers, projection_dim is not None)
    needed = {k for v in mapping.values() for k in ((v,) if isinstance(v, str) else v)}
    missing = sorted(needed - set(hf))
    if missing:
        raise UserError(f"{path}: {len(missing)} vision weights missing for the "
                        f"{layers}-layer tower its config.json describes, e.g. {missing[:3]}")
    extra = sorted(set(hf) - needed)
    if extra:
        raise UserError(f"{path}: weights beyond the {layers}-layer tower its config.json "
                        f"describes, e.g. {extra[:3]}; config.json and weights disagree")

    ours = visual.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, source in mapping.items():
        if isinstance(source, tuple):
            # nn.MultiheadAttention keeps q, k and v as one [3W, W] matrix, stacked in that order.
            names = ", ".join(source)
            value = torch.cat([hf[k] for k in source])
        else:
            names, value = source, hf[source]
            if key == "proj":
                value = value.T  # nn.Linear weight [out, in]; open_clip computes x @ proj [in, out]
        if value.shape != ours[key].shape:
            raise UserError(f"{path}: {names} has shape {tuple(value.shape)}, but the tower its "
                            f"config.json describes expects {tuple(ours[key].shape)} for {key}")
        state[key] = value
    visual.load_state_dict(state, strict=True)

    mean, std = OPENAI_MEAN, OPENAI_STD
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        processor = read_json(pre, "image processor config")
        mean = tuple(processor.get("image_mean", mean))
        std = tuple(processor.get("image_std", std))
    # Same dict open_clip.create_model attaches, so VisionTower.mean/std/image_size work as usual.
    set_model_preprocess_cfg(visual, {
        "size": visual.image_size, "mode": "RGB", "mean": mean, "std": std,
        "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0})
    visual.requires_grad_(False)
    return visual.eval()


def hf_clip_vision_state_dict(
        visual: nn.Module) -> tuple[CLIPVisionConfig, dict[str, torch.Tensor]]:
    """An open_clip `VisionTransformer` (attention as open_clip builds it, or split into q/k/v
    Linears as our VisionTower does) as a transformers `CLIPVisionModel`: (config, state dict).

    Keys are exactly those of the installed transformers' `CLIPVisionModel(config).state_dict()`,
    so a strict `load_state_dict` works: `embeddings.*`, `pre_layrnorm.*`, `encoder.layers.N.*`,
    `post_layernorm.*` in transformers 5 (which flattened the class), `vision_model.` + those in
    transformers 4. A transformers-5 `LlavaForConditionalGeneration` holds the tower at
    `model.vision_tower` (keys `model.vision_tower.embeddings...`); the caller adds that prefix
    or loads into `model.model.vision_tower` directly. Tensors are copies
    (contiguous, safe to save). `proj` is dropped: a CLIPVisionModel has no projection, and Llava
    reads hidden states. hidden_act is "quick_gelu" when the tower uses QuickGELU, else "gelu".
    Raises UserError for an open_clip tower a CLIPVisionModel cannot express (layer scale,
    attention pooling, custom blocks, non-square images).
    """
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer
    from transformers import CLIPVisionConfig, CLIPVisionModel

    def unsupported(what: str) -> UserError:
        return UserError(f"this open_clip vision tower has {what}, which transformers' "
                         "CLIPVisionModel cannot express; export needs a plain CLIP ViT")

    if not isinstance(visual, VisionTransformer):
        raise unsupported(f"type {type(visual).__name__} (not a VisionTransformer)")
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        raise unsupported(f"non-square image {visual.image_size} / patch {visual.patch_size}")
    if visual.attn_pool is not None:
        raise unsupported("attentional pooling")
    if not isinstance(visual.ln_pre, nn.LayerNorm):
        raise unsupported("no ln_pre")
    blocks = list(visual.transformer.resblocks)
    for block in blocks:
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            raise unsupported(f"a {type(block).__name__} block")
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            raise unsupported("layer scale")
    act = blocks[0].mlp.gelu
    if isinstance(act, QuickGELU):
        hidden_act = "quick_gelu"
    elif isinstance(act, nn.GELU) and act.approximate == "none":
        hidden_act = "gelu"
    else:
        raise unsupported(f"activation {act!r}")

    width = visual.transformer.width
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        hidden_act=hidden_act,
        layer_norm_eps=visual.ln_pre.eps,
        # Informational only (CLIPVisionModel has no projection); keeps the CLIP head's size.
        projection_dim=visual.proj.shape[1] if visual.proj is not None else width,
    )

    ours = visual.state_dict()
    split = "transformer.resblocks.0.attn.q_proj.weight" in ours
    state: dict[str, torch.Tensor] = {}
    for key, target in _hf_to_open_clip_keys(len(blocks), False, split_qkv=split).items():
        value = ours[key].detach()
        if isinstance(target, tuple):
            # Split the fused [3W(, W)] in-projection back into q, k, v.
            for name, part in zip(target, value.chunk(3), strict=True):
                state[name] = part.clone().contiguous()
        else:
            state[target] = value.clone().contiguous()

    # Whether the keys need `vision_model.` depends on the transformers version; ask the class
    # itself, built on the meta device (no memory, no init cost).
    with torch.device("meta"):
        expected = set(CLIPVisionModel(config).state_dict())
    if set(state) != expected:
        state = {_PREFIX + k: v for k, v in state.items()}
    assert set(state) == expected, sorted(expected ^ set(state))[:5]
    return config, state


def create_open_clip(name: str, pretrained: str | None = None, config_file: str | None = None) -> nn.Module:
    """The visual part of an open_clip model, frozen and in eval mode.

    `pretrained` is a local weights file (None: random init, for tests and the demo), or a
    Hugging Face CLIP folder (e.g. a download of openai/clip-vit-large-patch14-336); a folder's
    own config.json defines the tower, so `name` and `config_file` are then ignored.
    `config_file` registers a model config JSON first, named after the file's stem.
    """
    import open_clip

    if pretrained is not None and Path(pretrained).is_dir():
        # Any folder goes here: one in neither layout gets an error describing the HF layout.
        return open_clip_from_hf_dir(pretrained)
    if config_file is not None:
        if not Path(config_file).is_file():
            raise UserError(f"vision config file {config_file} not found")
        open_clip.add_model_config(config_file)
    if name not in open_clip.list_models():
        raise UserError(
            f"unknown open_clip model {name!r}; use a name from open_clip.list_models() "
            "(OpenAI weights need the -quickgelu variant, e.g. ViT-L-14-336-quickgelu) "
            "or set model.vision.config_file"
        )
    if pretrained is not None and not Path(pretrained).is_file():
        raise UserError(f"vision tower weights {pretrained} not found; set model.vision.pretrained")
    # open_clip warns about random init, which is what pretrained=None asks for.
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(name, pretrained=pretrained)
    except Exception as err:
        if pretrained is None:
            raise
        _explain_weights_error(Path(pretrained), name, err)
        raise
    finally:
        logging.disable(logging.NOTSET)
    return model.visual


def _explain_weights_error(file: Path, name: str, err: Exception) -> None:
    """open_clip failed on `file`: a corrupt file or a pickle that is not plain tensors raises
    UserError (load_weights' message); so do weights of another model. Else the bug stands."""
    load_weights(file)
    if isinstance(err, RuntimeError) and "state_dict" in str(err):
        first = str(err).strip().splitlines()[-1].strip()
        raise UserError(f"vision tower weights {file} do not fit open_clip model {name!r} "
                        f"({first}); set model.vision.name (and config_file) to the model "
                        "they belong to") from err
