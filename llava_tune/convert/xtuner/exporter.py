"""A run -> XTuner's LLaVA folders (`llava-tune export --format xtuner`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from llava_tune import rundir
from llava_tune.convert.internlm2 import (
    pack_wqkv,
)
from llava_tune.convert.lora import (
    ADAPTER_CONFIG,
    ADAPTER_SAFE,
    Lora,
    adapter_tensors,
    lora_scale,
    peft_adapter_config,
    read_lora_adapter,
    tidy_alpha,
)
from llava_tune.convert.projector import read_projector_state
from llava_tune.convert.vision_lora import (
    XTUNER_ADAPTER,
    write_clip_adapter,
)
from llava_tune.convert.weights import save_safetensors
from llava_tune.convert.xtuner.layout import (
    ADAPTER,
    LAYER,
    OUR_KEY,
    PROJECTOR,
    PROJECTOR_CONFIG_PY,
    PROJECTOR_MODEL_PY,
    QKV,
    RENAMES_BACK,
    llm_shape,
)
from llava_tune.errors import UserError
from llava_tune.files import read_json

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
        layer, suffix = LAYER.match(path).groups()
        if suffix in QKV:
            qkv.setdefault(layer, {})[suffix] = lora
        else:
            out[f"model.layers.{layer}.{RENAMES_BACK[suffix]}"] = lora
    shared = all(
        set(parts) == set(QKV)
        and all(torch.equal(parts[p].A, parts[QKV[0]].A) for p in QKV)
        and len({parts[p].alpha for p in QKV}) == 1
        for parts in qkv.values()
    )
    rows = {QKV[0]: shape["heads"] * shape["head_dim"], QKV[1]: shape["kv"] * shape["head_dim"],
            QKV[2]: shape["kv"] * shape["head_dim"]}
    for layer, parts in qkv.items():
        path = f"model.layers.{layer}.attention.wqkv"
        if shared:
            first = parts[QKV[0]]
            b = pack_wqkv(*(parts[p].B for p in QKV), *counts)
            out[path] = Lora(first.A, b, first.alpha)
            continue
        present = [p for p in QKV if p in parts]
        rank = sum(parts[p].r for p in present)
        first = parts[present[0]]
        scale = lora_scale(first.alpha, first.r, rslora)
        alpha = tidy_alpha(first.alpha * (math.sqrt(rank / first.r) if rslora else rank / first.r))
        dtype = first.B.dtype
        blocks, col = {}, 0
        for p in QKV:
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
        out[path] = Lora(a, pack_wqkv(*(blocks[p] for p in QKV), *counts), alpha)
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
    shape = llm_shape(base_dir)

    adapter = None
    if has_adapter:
        cfg, modules = read_lora_adapter(run_dir / ADAPTER, OUR_KEY)
        rslora = bool(cfg.get("use_rslora"))
        theirs = _to_xtuner(modules, shape, rslora)
        adapter_config = peft_adapter_config(theirs, "CAUSAL_LM", str(base_dir),
                                             cfg.get("lora_dropout", 0.0), rslora)
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
        (folder / PROJECTOR / "configuration_projector.py").write_text(PROJECTOR_CONFIG_PY)
        (folder / PROJECTOR / "modeling_projector.py").write_text(PROJECTOR_MODEL_PY)
    if adapter is not None:
        (folder / ADAPTER).mkdir()
        (folder / ADAPTER / ADAPTER_CONFIG).write_text(json.dumps(adapter[0], indent=2) + "\n")
        save_safetensors(adapter[1], folder / ADAPTER / ADAPTER_SAFE)
    if has_vision_adapter:
        write_clip_adapter(run_dir / rundir.VISION_ADAPTER, folder / XTUNER_ADAPTER, vision_base)
