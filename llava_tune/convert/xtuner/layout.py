"""XTuner's LLaVA layout: folder and module names, LoRA key patterns, the remote-code
projector files, and the sizes an InternLM2 adapter must have."""

from __future__ import annotations

import re
from pathlib import Path

from llava_tune.convert.internlm2 import (
    LINEAR_RENAMES,
    QKV_PROJS,
    head_counts,
)
from llava_tune.errors import UserError
from llava_tune.files import read_json

PROJECTOR = "projector"
ADAPTER = "llm_adapter"

RENAMES = LINEAR_RENAMES
RENAMES_BACK = {ours: theirs for theirs, ours in RENAMES.items()}
QKV = QKV_PROJS
XT_KEY = re.compile(
    r"^base_model\.model\.(model\.layers\.\d+\.(?:attention\.(?:wqkv|wo)|feed_forward\.w[123])"
    r"|output)\.lora_([AB])(?:\.default)?\.weight$"
)
OUR_KEY = re.compile(
    r"^base_model\.model\.(model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
    r"|lm_head)\.lora_([AB])(?:\.default)?\.weight$"
)
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Written into an exported projector/ so that XTuner's `AutoModel.from_pretrained(projector,
# trust_remote_code=True)` finds the classes its config.json names.
PROJECTOR_CONFIG_PY = '''\
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
PROJECTOR_MODEL_PY = '''\
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


def llm_shape(llm: Path) -> dict[str, int]:
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


def xtuner_io(path: str, shape: dict[str, int]) -> tuple[int, int] | None:
    """(in, out) features of an InternLM2 module path, or None past the last layer."""
    c, d = shape["hidden"], shape["head_dim"]
    if path == "output":
        return c, shape["vocab"]
    layer, suffix = LAYER.match(path).groups()
    if int(layer) >= shape["layers"]:
        return None
    return {
        "attention.wqkv": (c, (shape["heads"] + 2 * shape["kv"]) * d),
        "attention.wo": (shape["heads"] * d, c),
        "feed_forward.w1": (c, shape["inter"]),
        "feed_forward.w3": (c, shape["inter"]),
        "feed_forward.w2": (shape["inter"], c),
    }[suffix]


