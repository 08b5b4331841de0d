"""InternLM2 checkpoints <-> transformers Llama checkpoints.

InternLM2 is published in a remote-code format that transformers 5 cannot run, but its
architecture is Llama's with renamed keys and a packed ``wqkv``. So we train on
``LlamaForCausalLM`` and convert at the edges: a published InternLM2 folder becomes a Llama folder
before loading, and the trained weights are written back in InternLM2's layout for export.

Shapes below use H query heads, KV key-value heads, G = H // KV queries per key-value head,
D = hidden_size // H, C = hidden_size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig

from llava_tune import progress
from llava_tune.convert.weights import (
    SAFE_INDEX,
    SAFE_WEIGHTS,
    checkpoint_files,
    iter_checkpoint_shards,
    save_safetensors,
)
from llava_tune.errors import UserError
from llava_tune.files import atomic_dir, exclusive, read_json

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"

INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
}

# InternLM2's remote code implements only these rotary scalings; both exist in transformers too.
_ROPE_TYPES = ("linear", "dynamic")

LINEAR_RENAMES = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}
"""Per-layer InternLM2 linear module -> its Llama name, for the linears that are a plain rename
(wqkv is split into QKV_PROJS instead). Also the names of their LoRAs (convert/xtuner.py)."""
QKV_PROJS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

# Per-layer InternLM2 key suffix -> Llama key suffix, for the keys that are a plain rename.
_LAYER_RENAMES = {
    **{f"{intern}.weight": f"{llama}.weight" for intern, llama in LINEAR_RENAMES.items()},
    "attention.wo.bias": "self_attn.o_proj.bias",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER_RENAMES_BACK = {llama: intern for intern, llama in _LAYER_RENAMES.items()}
_TOP_RENAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_TOP_RENAMES_BACK = {llama: intern for intern, llama in _TOP_RENAMES.items()}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------- config


def _read_config(path: str | os.PathLike) -> dict[str, Any]:
    return read_json(Path(path) / CONFIG_NAME, "checkpoint config",
                     "point to a checkpoint folder with a valid config.json (re-download it)")


def is_internlm2_dir(path: str | os.PathLike) -> bool:
    """True when ``path/config.json`` exists and says ``"model_type": "internlm2"``.

    A folder without config.json is simply not InternLM2; an unreadable one raises UserError.
    """
    if not (Path(path) / CONFIG_NAME).is_file():
        return False
    return _read_config(path).get("model_type") == "internlm2"


def internlm2_to_llama_config(cfg: dict[str, Any]) -> LlamaConfig:
    """The LlamaConfig that runs an InternLM2 checkpoint whose config.json is ``cfg``.

    Missing optional fields take InternLM2Config's defaults (e.g. ``bias`` True), not Llama's.
    """
    heads = cfg["num_attention_heads"]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000)}
    scaling = cfg.get("rope_scaling")
    if scaling:
        if scaling.get("type") not in _ROPE_TYPES:
            raise ValueError(f"InternLM2 rope_scaling {scaling} is not one of {_ROPE_TYPES}")
        rope.update(rope_type=scaling["type"], factor=float(scaling["factor"]))
    llama = LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg["hidden_size"] // heads,
        hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        initializer_range=cfg.get("initializer_range", 0.02),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        use_cache=cfg.get("use_cache", True),
        pad_token_id=cfg.get("pad_token_id", 0),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        # transformers 5 reads rope_theta and the scaling from rope_parameters only; passing
        # them as rope_theta=/rope_scaling= also works but stores theta as a float.
        rope_parameters=rope,
        attention_bias=cfg.get("bias", True),
        mlp_bias=False,
        dtype=cfg.get("torch_dtype"),
    )
    llama.architectures = ["LlamaForCausalLM"]
    return llama


def llama_to_internlm2_config(cfg: LlamaConfig) -> dict[str, Any]:
    """config.json contents in the layout InternLM2 publishes, for a Llama config of that shape."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    if (getattr(cfg, "head_dim", None) or head_dim) != head_dim:
        raise ValueError(
            f"InternLM2 needs head_dim = hidden_size // heads = {head_dim}, got {cfg.head_dim}"
        )
    if getattr(cfg, "mlp_bias", False):
        raise ValueError("InternLM2 has no MLP bias; this Llama config has mlp_bias=True")
    rope = dict(cfg.rope_parameters or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        scaling = None
    elif rope_type in _ROPE_TYPES:
        scaling = {"type": rope_type, "factor": rope["factor"]}
    else:
        raise ValueError(f"InternLM2 supports rope types {_ROPE_TYPES}, not {rope_type!r}")
    theta = rope.get("rope_theta", 10000)
    # InternLM2 publishes an integer theta (1000000); keep that spelling when the value allows.
    if isinstance(theta, float) and theta.is_integer():
        theta = int(theta)
    dtype = cfg.dtype
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": dict(INTERNLM2_AUTO_MAP),
        "bias": bool(cfg.attention_bias),
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "hidden_act": cfg.hidden_act,
        "hidden_size": cfg.hidden_size,
        "initializer_range": cfg.initializer_range,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "model_type": "internlm2",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "pad_token_id": cfg.pad_token_id,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_scaling": scaling,
        "rope_theta": theta,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "torch_dtype": dtype,
        "use_cache": cfg.use_cache,
        "vocab_size": cfg.vocab_size,
    }


# --------------------------------------------------------------------------- tensors


def head_counts(heads: int, kv_heads: int, hidden: int) -> tuple[int, int, int]:
    if heads % kv_heads:
        raise ValueError(
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    return kv_heads, heads // kv_heads, hidden // heads


def split_wqkv(
    wqkv: torch.Tensor, kv_heads: int, groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """wqkv [(H + 2*KV)*D, C] (or its bias [(H + 2*KV)*D]) -> q [H*D, ...], k, v [KV*D, ...].

    Rows come per key-value head as G query heads, 1 key head, 1 value head; taking the query heads
    in that order gives Llama's repeat_kv pairing (query head h*G+g uses kv head h).
    """
    rest = wqkv.shape[1:]
    grouped = wqkv.reshape(kv_heads, groups + 2, head_dim, *rest)
    # clone: slices of one buffer share storage, which safetensors refuses to save.
    q = grouped[:, :groups].reshape(kv_heads * groups * head_dim, *rest).clone()
    k = grouped[:, groups].reshape(kv_heads * head_dim, *rest).clone()
    v = grouped[:, groups + 1].reshape(kv_heads * head_dim, *rest).clone()
    return q, k, v


def pack_wqkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int, groups: int, head_dim: int
) -> torch.Tensor:
    """Inverse of ``split_wqkv``: q [H*D, ...], k, v [KV*D, ...] -> wqkv [(H + 2*KV)*D, ...]."""
    rest = q.shape[1:]
    grouped = torch.cat(
        [
            q.reshape(kv_heads, groups, head_dim, *rest),
            k.reshape(kv_heads, 1, head_dim, *rest),
            v.reshape(kv_heads, 1, head_dim, *rest),
        ],
        dim=1,
    )
    return grouped.reshape(kv_heads * (groups + 2) * head_dim, *rest)


def internlm2_to_llama_tensors(
    key: str, tensor: torch.Tensor, cfg: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """One InternLM2 tensor -> its Llama key(s): ``wqkv`` gives q/k/v_proj, everything else one key.

    Working one key at a time lets a conversion stream shard by shard. ``cfg`` is InternLM2's
    config.json. Shapes are kept except wqkv [(H + 2*KV)*D, C] -> q [H*D, C], k and v [KV*D, C].
    Raises ValueError for a key that is not part of InternLM2.
    """
    if key in _TOP_RENAMES:
        return {_TOP_RENAMES[key]: tensor}
    match = _LAYER_KEY.match(key)
    if match:
        prefix, suffix = f"model.layers.{match.group(1)}.", match.group(2)
        if suffix in _LAYER_RENAMES:
            return {prefix + _LAYER_RENAMES[suffix]: tensor}
        if suffix in ("attention.wqkv.weight", "attention.wqkv.bias"):
            heads = cfg["num_attention_heads"]
            counts = head_counts(
                heads, cfg.get("num_key_value_heads") or heads, cfg["hidden_size"]
            )
            kind = suffix.rsplit(".", 1)[1]
            q, k, v = split_wqkv(tensor, *counts)
            return {
                f"{prefix}self_attn.q_proj.{kind}": q,
                f"{prefix}self_attn.k_proj.{kind}": k,
                f"{prefix}self_attn.v_proj.{kind}": v,
            }
        if suffix.endswith("rotary_emb.inv_freq"):
            # A derived buffer some exports include; Llama recomputes it from the config.
            return {}
    raise ValueError(f"unknown InternLM2 checkpoint key {key!r}")


def llama_to_internlm2_state_dict(
    sd: dict[str, torch.Tensor], cfg: LlamaConfig
) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM state dict -> InternLM2 keys, packing q/k/v_proj back into ``wqkv``.

    Shapes are kept except q [H*D, C], k and v [KV*D, C] -> wqkv [(H + 2*KV)*D, C] (biases alike).
    Raises ValueError for a key InternLM2 has no place for, or a layer missing q, k or v.
    """
    counts = head_counts(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        if key in _TOP_RENAMES_BACK:
            out[_TOP_RENAMES_BACK[key]] = tensor
            continue
        match = _LAYER_KEY.match(key)
        suffix = match.group(2) if match else ""
        if match and suffix in _LAYER_RENAMES_BACK:
            out[f"model.layers.{match.group(1)}.{_LAYER_RENAMES_BACK[suffix]}"] = tensor
        elif match and re.fullmatch(r"self_attn\.[qkv]_proj\.(weight|bias)", suffix):
            proj, kind = suffix.split(".")[1:]
            qkv.setdefault((match.group(1), kind), {})[proj[0]] = tensor
        elif suffix.endswith("rotary_emb.inv_freq"):
            continue  # derived from the config; InternLM2 recomputes it too
        else:
            raise ValueError(f"unknown Llama state dict key {key!r} (no InternLM2 counterpart)")
    for (layer, kind), parts in qkv.items():
        missing = sorted(set("qkv") - parts.keys())
        if missing:
            names = ", ".join(f"model.layers.{layer}.self_attn.{p}_proj.{kind}" for p in missing)
            raise ValueError(f"state dict lacks {names}, needed to pack wqkv")
        packed = pack_wqkv(parts["q"], parts["k"], parts["v"], *counts)
        out[f"model.layers.{layer}.attention.wqkv.{kind}"] = packed
    if (
        "output.weight" not in out
        and cfg.tie_word_embeddings
        and "model.tok_embeddings.weight" in out
    ):
        # A tied model may carry only the embedding; InternLM2 always stores its head.
        out["output.weight"] = out["model.tok_embeddings.weight"]
    return out


# --------------------------------------------------------------------------- files


def _safetensors_name(shard: str) -> str:
    """pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors (names kept otherwise)."""
    if shard.endswith(".safetensors"):
        return shard
    stem = shard.removesuffix(".bin")
    if stem.startswith("pytorch_model"):
        stem = "model" + stem.removeprefix("pytorch_model")
    return stem + ".safetensors"


def _is_complete(path: Path) -> bool:
    if not (path / CONFIG_NAME).is_file():
        return False
    try:
        checkpoint_files(path)
    except UserError:
        return False
    return True


def convert_internlm2_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write the InternLM2 checkpoint in ``src`` as a transformers Llama checkpoint in ``dst``.

    ``dst`` gets config.json and safetensors shards split like the source (plus
    model.safetensors.index.json when there are several). Shards are converted one at a time, so
    peak memory is about one shard. The folder is built beside ``dst`` and renamed into place, so
    an interrupted run leaves no half-written ``dst``; a complete ``dst`` is returned untouched.
    Tokenizer files are not copied. Processes converting the same ``dst`` at once take turns
    (a lock beside it): the first converts, the others return its result.
    """
    src, dst = Path(src), Path(dst)
    if _is_complete(dst):
        return dst
    if not is_internlm2_dir(src):
        raise UserError(
            f"{src} is not an InternLM2 checkpoint (its config.json must say "
            f'"model_type": "internlm2"); point to the downloaded InternLM2 folder'
        )
    # The processes of one launch all load the LLM at once: one converts, the others wait
    # for it and find dst complete (converting side by side, one of them crashed).
    with exclusive(dst):
        if _is_complete(dst):
            return dst
        return _convert(src, dst)


def _convert(src: Path, dst: Path) -> Path:
    cfg = _read_config(src)
    with atomic_dir(dst) as tmp:
        weight_map: dict[str, str] = {}
        total_size = 0
        names = []
        shards = progress.track(iter_checkpoint_shards(src), total=len(checkpoint_files(src)),
                                desc=f"converting {src.name} to Llama", unit="shard")
        for shard, state_dict in shards:
            name = _safetensors_name(shard)
            names.append(name)
            converted: dict[str, torch.Tensor] = {}
            for key in list(state_dict):
                # pop: drop each source tensor as soon as it is converted.
                converted.update(internlm2_to_llama_tensors(key, state_dict.pop(key), cfg))
            save_safetensors(converted, tmp / name)
            for key, tensor in converted.items():
                weight_map[key] = name
                total_size += tensor.numel() * tensor.element_size()
            del converted
        if len(names) > 1:
            index = {
                "metadata": {"total_size": total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        elif names != [SAFE_WEIGHTS]:
            os.replace(tmp / names[0], tmp / SAFE_WEIGHTS)  # one shard is a plain model.safetensors
        internlm2_to_llama_config(cfg).save_pretrained(tmp)
    return dst


def write_internlm2_checkpoint(
    state_dict: dict[str, torch.Tensor],
    cfg: LlamaConfig,
    folder: str | os.PathLike,
    extra_files: Sequence[Path] = (),
    stop_token_ids: Sequence[int] = (),
) -> None:
    """Write a LlamaForCausalLM state dict into `folder` as a published-layout InternLM2
    checkpoint: config.json (InternLM2 layout, remote-code auto_map), one model.safetensors
    with InternLM2 keys, and `extra_files` (the tokenizer's) copied in.

    `stop_token_ids` (the chat template's end of turn, `<|im_end|>`) also end generation:
    generation_config.json lists them with the EOS, as InternLM2-chat publishes it. Servers
    stop on its ids; lmdeploy's stop words from a tokenizer's chat template are only its
    eos_token (lmdeploy 0.18.0, model.py HFChatTemplate), which is `</s>`."""
    folder = Path(folder)
    internlm2_cfg = llama_to_internlm2_config(cfg)
    save_safetensors(llama_to_internlm2_state_dict(state_dict, cfg), folder / SAFE_WEIGHTS)
    (folder / CONFIG_NAME).write_text(json.dumps(internlm2_cfg, indent=2) + "\n")
    for file in extra_files:
        shutil.copy2(file, folder / Path(file).name)
    if stop_token_ids:
        base_eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        eos = list(dict.fromkeys(i for i in (*base_eos, *stop_token_ids) if i is not None))
        generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos,
                      "pad_token_id": cfg.pad_token_id}
        (folder / GENERATION_CONFIG_NAME).write_text(json.dumps(generation, indent=2) + "\n")


def remote_code_files(folder: str | os.PathLike) -> list[str]:
    """The Python files that `folder`'s config.json and tokenizer_config.json name in their
    `auto_map` (what `trust_remote_code=True` imports: configuration_internlm2.py,
    modeling_internlm2.py, tokenization_internlm2*.py), in order, each once. Entries that
    point at another repository ("repo--module.Class") are not files of this folder."""
    names: list[str] = []
    for config in (CONFIG_NAME, "tokenizer_config.json"):
        file = Path(folder) / config
        auto_map = read_json(file).get("auto_map") if file.is_file() else None
        for value in (auto_map or {}).values():
            for entry in value if isinstance(value, list) else [value]:
                if isinstance(entry, str) and "--" not in entry and "." in entry:
                    names.append(entry.rsplit(".", 1)[0] + ".py")
    return list(dict.fromkeys(names))


def save_internlm2_checkpoint(state_dict: dict[str, torch.Tensor], cfg: LlamaConfig,
                              out_dir: str | os.PathLike, extra_files: Sequence[Path] = ()) -> None:
    """`write_internlm2_checkpoint` into `out_dir`, which appears complete or not at all."""
    with atomic_dir(out_dir) as tmp:
        write_internlm2_checkpoint(state_dict, cfg, tmp, extra_files)
