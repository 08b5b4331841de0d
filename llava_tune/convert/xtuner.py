"""XTuner's LLaVA artifacts <-> llava-tune run dirs.

XTuner's LLaVA on InternLM2 saves ``projector/`` (its ProjectorModel: Linear, GELU, Linear under
``model.*``, the keys our Projector uses) and ``llm_adapter/``: a PEFT LoRA adapter on InternLM2's
own module names (``attention.wqkv``, ``attention.wo``, ``feed_forward.w1/w2/w3``, maybe
``output``). We train a transformers Llama with q/k/v/o_proj, gate/up/down_proj and lm_head, so
the adapter is renamed and ``wqkv``'s LoRA split or packed by rows exactly like the base weight
(per key-value head: G query heads, then the key head, then the value head; see
``convert/internlm2.py`` and, for LoRA arithmetic, ``convert/lora.py``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import peft
import torch

from llava_tune import rundir
from llava_tune.config import (
    Config,
    LoraConfig,
    ModelConfig,
    TrainConfig,
    VisionConfig,
    VisionLoraConfig,
    config_to_yaml,
)
from llava_tune.convert.internlm2 import (
    LINEAR_RENAMES,
    QKV_PROJS,
    head_counts,
    pack_wqkv,
    split_wqkv,
)
from llava_tune.convert.lora import (
    ADAPTER_CONFIG,
    ADAPTER_SAFE,
    Lora,
    adapter_tensors,
    lora_patterns,
    lora_scale,
    read_lora_adapter,
    target_module_names,
    tidy_alpha,
)
from llava_tune.convert.projector import read_projector_state, write_projector_state
from llava_tune.convert.vision_lora import (
    XTUNER_ADAPTER,
    XTUNER_FULL,
    read_clip_adapter,
    tower_shape,
    write_clip_adapter,
    write_our_adapter,
)
from llava_tune.convert.weights import save_safetensors
from llava_tune.convert.xtuner_config import FILE as XTUNER_CONFIG
from llava_tune.convert.xtuner_config import read_xtuner_config
from llava_tune.data.template import TEMPLATES
from llava_tune.errors import UserError
from llava_tune.files import atomic_dir, read_json

PROJECTOR = "projector"
ADAPTER = "llm_adapter"

_RENAMES = LINEAR_RENAMES
_RENAMES_BACK = {ours: theirs for theirs, ours in _RENAMES.items()}
_QKV = QKV_PROJS
_XT_KEY = re.compile(
    r"^base_model\.model\.(model\.layers\.\d+\.(?:attention\.(?:wqkv|wo)|feed_forward\.w[123])"
    r"|output)\.lora_([AB])(?:\.default)?\.weight$"
)
_OUR_KEY = re.compile(
    r"^base_model\.model\.(model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
    r"|lm_head)\.lora_([AB])(?:\.default)?\.weight$"
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Written into an exported projector/ so that XTuner's `AutoModel.from_pretrained(projector,
# trust_remote_code=True)` finds the classes its config.json names.
_PROJECTOR_CONFIG_PY = '''\
"""XTuner-compatible projector config (written by llava-tune's export)."""
from transformers import PretrainedConfig


class ProjectorConfig(PretrainedConfig):
    model_type = "projector"
    _auto_class = "AutoConfig"

    def __init__(self, visual_hidden_size=4096, llm_hidden_size=4096, depth=2,
                 hidden_act="gelu", bias=True, **kwargs):
        self.visual_hidden_size = visual_hidden_size
        self.llm_hidden_size = llm_hidden_size
        self.depth = depth
        self.hidden_act = hidden_act
        self.bias = bias
        super().__init__(**kwargs)
'''
_PROJECTOR_MODEL_PY = '''\
"""XTuner-compatible projector: Linear, then (activation, Linear) x (depth - 1), under `model`."""
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from .configuration_projector import ProjectorConfig


class ProjectorModel(PreTrainedModel):
    _auto_class = "AutoModel"
    config_class = ProjectorConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True

    def __init__(self, config):
        super().__init__(config)
        layers = [nn.Linear(config.visual_hidden_size, config.llm_hidden_size, bias=config.bias)]
        for _ in range(config.depth - 1):
            layers.append(ACT2FN[config.hidden_act])
            layers.append(nn.Linear(config.llm_hidden_size, config.llm_hidden_size,
                                    bias=config.bias))
        self.model = nn.Sequential(*layers)
        self.post_init()

    def forward(self, x):
        return self.model(x)
'''


# --------------------------------------------------------------------------- reading


def _llm_shape(llm: Path) -> dict[str, int]:
    """Sizes the conversion needs, from the base LLM's config.json (InternLM2 or Llama)."""
    if not (llm / "config.json").is_file():
        raise UserError(f"base LLM {llm} has no config.json; point --llm at the InternLM2 "
                        "checkpoint folder the XTuner model was trained on")
    cfg = read_json(llm / "config.json")
    if cfg.get("model_type") not in ("internlm2", "llama"):
        raise UserError(f"base LLM {llm} is a {cfg.get('model_type')!r} model; XTuner's "
                        "InternLM2 adapters need an InternLM2 (or InternLM2-as-Llama) checkpoint")
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    if cfg["model_type"] == "internlm2":
        head_counts(heads, kv, hidden)
    return {"hidden": hidden, "heads": heads, "kv": kv, "groups": heads // kv, "head_dim": head_dim,
            "inter": cfg["intermediate_size"], "vocab": cfg["vocab_size"],
            "layers": cfg["num_hidden_layers"]}


def _xtuner_io(path: str, shape: dict[str, int]) -> tuple[int, int] | None:
    """(in, out) features of an InternLM2 module path, or None past the last layer."""
    c, d = shape["hidden"], shape["head_dim"]
    if path == "output":
        return c, shape["vocab"]
    layer, suffix = _LAYER.match(path).groups()
    if int(layer) >= shape["layers"]:
        return None
    return {
        "attention.wqkv": (c, (shape["heads"] + 2 * shape["kv"]) * d),
        "attention.wo": (shape["heads"] * d, c),
        "feed_forward.w1": (c, shape["inter"]),
        "feed_forward.w3": (c, shape["inter"]),
        "feed_forward.w2": (shape["inter"], c),
    }[suffix]


# --------------------------------------------------------------------------- import


def _to_ours(modules: dict[str, Lora], shape: dict[str, int]) -> dict[str, Lora]:
    """InternLM2 LoRAs -> Llama LoRAs: wqkv's B split by rows like the base weight, A shared."""
    out = {}
    counts = (shape["kv"], shape["groups"], shape["head_dim"])
    for path, lora in modules.items():
        if path == "output":
            out["lm_head"] = lora
            continue
        layer, suffix = _LAYER.match(path).groups()
        prefix = f"model.layers.{layer}."
        if suffix == "attention.wqkv":
            for proj, b in zip(_QKV, split_wqkv(lora.B, *counts), strict=True):
                out[prefix + proj] = Lora(lora.A, b, lora.alpha)
        else:
            out[prefix + _RENAMES[suffix]] = lora
    return out


def _check_adapter_shapes(modules: dict[str, Lora], shape: dict[str, int], llm: Path,
                          file: Path) -> None:
    for path, lora in modules.items():
        io = _xtuner_io(path, shape)
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
    shape = _llm_shape(llm)
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
        adapter_cfg, theirs = read_lora_adapter(xtuner_dir / ADAPTER, _XT_KEY)
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
        train.vision_lora = VisionLoraConfig(
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


# --------------------------------------------------------------------------- export


def _to_xtuner(modules: dict[str, Lora], shape: dict[str, int], rslora: bool) -> dict[str, Lora]:
    """Llama LoRAs -> InternLM2 LoRAs; see `export_xtuner` for how q/k/v become one wqkv LoRA."""
    counts = (shape["kv"], shape["groups"], shape["head_dim"])
    out: dict[str, Lora] = {}
    qkv: dict[str, dict[str, Lora]] = {}
    for path, lora in modules.items():
        if path == "lm_head":
            out["output"] = lora
            continue
        layer, suffix = _LAYER.match(path).groups()
        if suffix in _QKV:
            qkv.setdefault(layer, {})[suffix] = lora
        else:
            out[f"model.layers.{layer}.{_RENAMES_BACK[suffix]}"] = lora
    shared = all(
        set(parts) == set(_QKV)
        and all(torch.equal(parts[p].A, parts[_QKV[0]].A) for p in _QKV)
        and len({parts[p].alpha for p in _QKV}) == 1
        for parts in qkv.values()
    )
    rows = {_QKV[0]: shape["heads"] * shape["head_dim"], _QKV[1]: shape["kv"] * shape["head_dim"],
            _QKV[2]: shape["kv"] * shape["head_dim"]}
    for layer, parts in qkv.items():
        path = f"model.layers.{layer}.attention.wqkv"
        if shared:
            first = parts[_QKV[0]]
            b = pack_wqkv(*(parts[p].B for p in _QKV), *counts)
            out[path] = Lora(first.A, b, first.alpha)
            continue
        present = [p for p in _QKV if p in parts]
        rank = sum(parts[p].r for p in present)
        first = parts[present[0]]
        scale = lora_scale(first.alpha, first.r, rslora)
        alpha = tidy_alpha(first.alpha * (math.sqrt(rank / first.r) if rslora else rank / first.r))
        dtype = first.B.dtype
        blocks, col = {}, 0
        for p in _QKV:
            block = torch.zeros(rows[p], rank, dtype=dtype)
            if p in parts:
                lora = parts[p]
                b = lora.B
                ratio = lora_scale(lora.alpha, lora.r, rslora) / scale
                if ratio != 1.0:
                    b = b * ratio
                block[:, col:col + lora.r] = b
                col += lora.r
            blocks[p] = block
        a = torch.cat([parts[p].A for p in present], dim=0)
        out[path] = Lora(a, pack_wqkv(*(blocks[p] for p in _QKV), *counts), alpha)
    return out


def write_xtuner(run_dir: Path, folder: Path, base_dir: Path, vision_base: str | None = None) -> None:
    """Write a run's projector, LLM LoRA and vision-tower LoRA in XTuner's LLaVA layout into
    ``folder``.

    ``folder`` gets ``projector/`` (XTuner's ProjectorModel: config.json with
    visual_hidden_size / llm_hidden_size / depth / hidden_act / bias, model.safetensors, and the
    two small remote-code files its auto_map names) and, when the run trained a LoRA,
    ``llm_adapter/``: a PEFT adapter on InternLM2's module names (o_proj -> wo, gate_proj -> w1,
    up_proj -> w3, down_proj -> w2, lm_head -> output), and, when the tower has a LoRA,
    ``visual_encoder_adapter/``: that LoRA on transformers' CLIPVisionModel names (a rename, see
    convert/vision_lora.py; ``vision_base``, the tower's folder or name, goes in its
    ``base_model_name_or_path``). The tower's own weights are not written here (see export.py
    for a fully trained tower); XTuner loads its own CLIP encoder. PEFT's copy of an untrained
    ``lm_head`` base weight is dropped.

    q/k/v_proj LoRAs become one ``wqkv`` LoRA. When every layer's q, k and v share one lora_A
    (an imported XTuner adapter), B is packed by rows like the base weight: the original
    adapter, bit for bit. Ours are trained independently, so instead they are packed losslessly
    by stacking in rank: wqkv lora_A = concat(A_q, A_k, A_v) [3r, hidden] and lora_B is
    block-diagonal in rank, [(H + 2*KV)*D, 3r], B_q in columns 0..r of the query rows, B_k in
    r..2r of the key rows, B_v in 2r..3r of the value rows, rows placed per key-value group as
    in the base wqkv. Then B' @ A' stacks B_q A_q, B_k A_k, B_v A_v exactly. wqkv's rank is
    r' = 3r, and its alpha is scaled so the LoRA scale is unchanged (alpha'/r' = alpha/r;
    alpha' / sqrt(r') with rsLoRA); both go in the adapter's rank_pattern / alpha_pattern, the
    other modules keeping r and alpha. A layer missing one of q/k/v gets zero rows for it.

    ``base_dir`` is the run's base LLM (needed for the head counts).
    """
    if (run_dir / "llm").is_dir():
        raise UserError(f"{run_dir} trained the full LLM (llm/); XTuner's llm_adapter layout "
                        "holds LoRA adapters only: export the LLM with --format internlm2")
    has_projector = (run_dir / PROJECTOR).is_dir()
    has_adapter = (run_dir / ADAPTER).is_dir()
    has_vision_adapter = (run_dir / rundir.VISION_ADAPTER).is_dir()
    if not has_projector and not has_adapter:
        raise UserError(f"{run_dir} has neither {PROJECTOR}/ nor {ADAPTER}/ to export")
    shape = _llm_shape(base_dir)

    adapter = None
    if has_adapter:
        cfg, modules = read_lora_adapter(run_dir / ADAPTER, _OUR_KEY)
        rslora = bool(cfg.get("use_rslora"))
        theirs = _to_xtuner(modules, shape, rslora)
        r, alpha, rank_pattern, alpha_pattern = lora_patterns(theirs)
        adapter_config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(base_dir),
            "r": r, "lora_alpha": alpha, "lora_dropout": cfg.get("lora_dropout", 0.0),
            "target_modules": target_module_names(theirs), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "revision": None,
        }
        # Only when needed: PEFT before 0.6 / 0.7 refuses keys it does not know.
        if rank_pattern or alpha_pattern:
            adapter_config.update(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
        if rslora:
            adapter_config["use_rslora"] = True
        adapter = (adapter_config, adapter_tensors(theirs))

    projector = None
    if has_projector:
        own = read_json(run_dir / PROJECTOR / "config.json")
        width, hidden = own["vision_hidden_size"], own["llm_hidden_size"]
        state, depth = read_projector_state(run_dir / PROJECTOR, width, hidden,
                                       f"its config.json (width {width}, hidden {hidden})")
        dtype = str(state["model.0.weight"].dtype).removeprefix("torch.")
        projector = (state, {
            "architectures": ["ProjectorModel"],
            "auto_map": {"AutoConfig": "configuration_projector.ProjectorConfig",
                         "AutoModel": "modeling_projector.ProjectorModel"},
            "bias": True, "depth": depth, "hidden_act": "gelu", "llm_hidden_size": hidden,
            "model_type": "projector", "torch_dtype": dtype, "visual_hidden_size": width,
        })

    if projector is not None:
        (folder / PROJECTOR).mkdir()
        save_safetensors(projector[0], folder / PROJECTOR / "model.safetensors")
        (folder / PROJECTOR / "config.json").write_text(json.dumps(projector[1], indent=2) + "\n")
        (folder / PROJECTOR / "configuration_projector.py").write_text(_PROJECTOR_CONFIG_PY)
        (folder / PROJECTOR / "modeling_projector.py").write_text(_PROJECTOR_MODEL_PY)
    if adapter is not None:
        (folder / ADAPTER).mkdir()
        (folder / ADAPTER / ADAPTER_CONFIG).write_text(json.dumps(adapter[0], indent=2) + "\n")
        save_safetensors(adapter[1], folder / ADAPTER / ADAPTER_SAFE)
    if has_vision_adapter:
        write_clip_adapter(run_dir / rundir.VISION_ADAPTER, folder / XTUNER_ADAPTER, vision_base)
