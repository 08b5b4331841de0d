"""LoRA adapters as tensors: read a PEFT LoRA folder, rename or reshape its modules, write one.

A LoRA on a linear layer adds ``scale * B @ A`` to its weight (``scale = alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA). Rows of ``B`` are output features, so splitting ``B`` by rows
and keeping ``A`` splits the update exactly as the base weight is split; LoRAs of several
modules stack into one of rank r1 + r2 + ... (A's stacked, B block-diagonal in rank).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils.other import get_pattern_key

from llava_tune.convert.weights import check_weight_file, load_first_weights
from llava_tune.errors import UserError
from llava_tune.files import read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PREFIX = "base_model.model."


def check_adapter_folder(folder: Path) -> None:
    """A PEFT adapter folder that peft can load: raise UserError naming a damaged or missing
    adapter_config.json or weights file (peft's own errors for them are tracebacks)."""
    fix = "restore the folder from a backup, or train again"
    read_json(folder / ADAPTER_CONFIG, "adapter config", fix)
    names = (ADAPTER_SAFE, ADAPTER_BIN)
    present = [folder / name for name in names if (folder / name).is_file()]
    if not present:
        raise UserError(f"no adapter weights in {folder}: expected {' or '.join(names)}; {fix}")
    check_weight_file(present[0])


@dataclass
class Lora:
    """One module's LoRA: update = scale * B @ A, A [r, in], B [out, r]."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: float

    @property
    def r(self) -> int:
        return self.A.shape[0]


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / (math.sqrt(r) if rslora else r)


def tidy_alpha(number: float) -> int | float:
    """An alpha that is a whole number is written as an int (PEFT and our Config both do)."""
    return int(round(number)) if abs(number - round(number)) < 1e-9 else number


def read_lora_adapter(folder: Path, key_pattern: re.Pattern) -> tuple[dict[str, Any], dict[str, Lora]]:
    """(adapter_config.json, module path -> its LoRA) of a PEFT LoRA adapter folder.

    Module paths are relative to the causal LM (``model.layers.0.attention.wqkv``, ``output``).
    Keys ``key_pattern`` does not know, and PEFT features that change the update beyond
    ``scale * B @ A``, are refused.
    """
    cfg = read_json(folder / ADAPTER_CONFIG)
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}, not LORA")
    if cfg.get("use_dora"):
        problems.append("use_dora is set (DoRA has no LoRA equivalent)")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        problems.append(f"bias={cfg.get('bias')!r} / lora_bias={cfg.get('lora_bias')!r} "
                        "(trained biases are not supported)")
    if cfg.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out is set")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save={cfg['modules_to_save']} (fully trained modules)")
    if problems:
        raise UserError(f"{folder} cannot be converted: " + "; ".join(problems))
    file, state = load_first_weights(folder, (ADAPTER_SAFE, ADAPTER_BIN))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = key_pattern.match(key)
        if match is None:
            if key.endswith("lm_head.base_layer.weight"):
                continue  # PEFT's copy of the (untrained) base head; the base LLM has it
            raise UserError(f"{file}: unexpected key {key!r}; only LoRA A/B weights of "
                            "the attention, MLP and output layers can be converted")
        parts.setdefault(match.group(1), {})[match.group(2)] = tensor
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    modules = {}
    for path, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise UserError(f"{file}: {path} has lora_{''.join(ab)} without its partner")
        lora = Lora(ab["A"], ab["B"],
                     alphas.get(get_pattern_key(list(alphas), path), cfg.get("lora_alpha", 8)))
        expected_r = ranks.get(get_pattern_key(list(ranks), path), cfg.get("r", 8))
        if lora.A.ndim != 2 or lora.B.ndim != 2 or lora.B.shape[1] != lora.r or lora.r != expected_r:
            raise UserError(f"{file}: {path} has lora_A {tuple(lora.A.shape)} and lora_B "
                            f"{tuple(lora.B.shape)}, not rank {expected_r} as {ADAPTER_CONFIG} says; "
                            f"the two files come from different trainings: copy {ADAPTER_CONFIG} "
                            "and the weights from the same one")
        modules[path] = lora
    if not modules:
        raise UserError(f"{file} holds no LoRA weights")
    return cfg, modules


def lora_patterns(modules: dict[str, Lora]) -> tuple[int, int | float, dict, dict]:
    """Global (r, alpha) = the most common pair; rank_pattern / alpha_pattern for the rest, keyed
    by module name when all its layers agree, else by the module's full path."""
    pairs = {path: (lora.r, tidy_alpha(lora.alpha)) for path, lora in modules.items()}
    r, alpha = Counter(pairs.values()).most_common(1)[0][0]
    by_leaf: dict[str, set] = {}
    for path, pair in pairs.items():
        by_leaf.setdefault(path.rsplit(".", 1)[-1], set()).add(pair)
    rank_pattern, alpha_pattern = {}, {}
    for path, (pr, pa) in sorted(pairs.items()):
        leaf = path.rsplit(".", 1)[-1]
        key = leaf if len(by_leaf[leaf]) == 1 else re.escape(path)
        if pr != r:
            rank_pattern[key] = pr
        if pa != alpha:
            alpha_pattern[key] = pa
    return r, alpha, rank_pattern, alpha_pattern


def adapter_tensors(modules: dict[str, Lora]) -> dict[str, torch.Tensor]:
    out = {}
    for path, lora in modules.items():
        out[f"{PREFIX}{path}.lora_A.weight"] = lora.A
        out[f"{PREFIX}{path}.lora_B.weight"] = lora.B
    return out


def target_module_names(modules: dict[str, Lora]) -> list[str]:
    return sorted({path.rsplit(".", 1)[-1] for path in modules})


def peft_adapter_config(modules: dict[str, Lora], task_type: str | None, base: str | None,
                        dropout: float, rslora: bool) -> dict[str, Any]:
    """adapter_config.json for `modules` in PEFT's layout: the most common (r, alpha) pair as
    r / lora_alpha, the others in rank_pattern / alpha_pattern (only when there are any: PEFT
    before 0.6 / 0.7 refuses keys it does not know)."""
    r, alpha, rank_pattern, alpha_pattern = lora_patterns(modules)
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base,
        "r": r, "lora_alpha": tidy_alpha(alpha), "lora_dropout": dropout,
        "target_modules": target_module_names(modules), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "revision": None,
    }
    if rank_pattern or alpha_pattern:
        config.update(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if rslora:
        config["use_rslora"] = True
    return config
