"""The projector folder: config.json + model.safetensors with keys `model.0.*`, `model.2.*`, ...

The layout of XTuner's ProjectorModel (Linear, then (GELU, Linear) x (depth - 1) under
`model`), which is also what our run dirs hold, so one reader serves run dirs, init_from and
XTuner's folders.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from llava_tune.convert.weights import load_first_weights, save_safetensors
from llava_tune.errors import UserError
from llava_tune.files import atomic_dir, read_json
from llava_tune.models.projector import Projector

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
NEWLINE = "image_newline"


def read_projector_state(folder: Path, vision_width: int, llm_hidden: int,
                         what: str) -> tuple[dict[str, torch.Tensor], int]:
    """Projector weights (model.N.weight/bias) checked against the tower's feature width and the
    LLM's hidden size (`what` describes those two for messages), and the projector's depth.

    A projector saved without biases gets zero biases: the same function. An anyres run's
    projector also holds `image_newline` [llm_hidden].
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"projector folder {folder} not found")
    cfg = read_json(folder / "config.json", "projector config") if (folder / "config.json").is_file() else {}
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise UserError(f"{folder}/config.json: hidden_act {act!r}; llava-tune's projector uses "
                        "exact GELU ('gelu') between its layers")
    file, state = load_first_weights(folder, WEIGHT_FILES)
    weights = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"model\.(\d+)\.weight", k)))
    depth = len(weights)
    if depth == 0 or weights != list(range(0, 2 * depth, 2)):
        raise UserError(f"{file}: keys {sorted(state)} are not a projector's "
                        "(model.0.weight, model.2.weight, ...)")
    if "depth" in cfg and cfg["depth"] != depth:
        raise UserError(f"{folder}/config.json says depth {cfg['depth']}, {file} has {depth} layers")
    expected = {}
    for i in range(depth):
        expected[f"model.{2 * i}.weight"] = (llm_hidden, vision_width if i == 0 else llm_hidden)
        expected[f"model.{2 * i}.bias"] = (llm_hidden,)
    if NEWLINE in state:
        expected[NEWLINE] = (llm_hidden,)
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise UserError(f"{file}: unexpected keys {unknown}")
    out = {}
    for key, shape in expected.items():
        tensor = state.get(key)
        if tensor is None and key.endswith(".bias"):
            tensor = torch.zeros(shape, dtype=state[key.replace(".bias", ".weight")].dtype)
        if tuple(tensor.shape) != shape:
            raise UserError(
                f"{file}: {key} has shape {tuple(tensor.shape)}, expected {shape} for {what}; "
                "the projector was trained for another vision tower or LLM")
        out[key] = tensor
    return out, depth


def write_projector_state(folder: Path, state: dict[str, torch.Tensor], vision_width: int,
                          llm_hidden: int, depth: int) -> None:
    """Write a projector folder (inside a folder being written atomically)."""
    folder.mkdir()
    save_safetensors(state, folder / "model.safetensors")
    config = {"vision_hidden_size": vision_width, "llm_hidden_size": llm_hidden, "depth": depth}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_projector(projector: Projector, folder: Path) -> None:
    """config.json + model.safetensors; the folder appears complete or not at all."""
    cfg = projector.config
    with atomic_dir(folder) as tmp:
        tmp.rmdir()  # write_projector_state makes the folder itself
        write_projector_state(tmp, projector.state_dict(), cfg["vision_hidden_size"],
                              cfg["llm_hidden_size"], cfg["depth"])


def load_projector(projector: Projector, folder: Path) -> None:
    """Load a projector folder into `projector`; a depth or width that does not fit names both
    and the fix."""
    cfg = projector.config
    what = (f"this model (vision features {cfg['vision_hidden_size']}, LLM hidden size "
            f"{cfg['llm_hidden_size']})")
    state, depth = read_projector_state(folder, cfg["vision_hidden_size"], cfg["llm_hidden_size"],
                                        what)
    if depth != cfg["depth"]:
        raise UserError(f"projector {folder} has depth {depth}, this config has "
                        f"model.projector_depth={cfg['depth']}; set model.projector_depth={depth} "
                        "to use it")
    if NEWLINE in state and projector.image_newline is None:
        raise UserError(f"projector {folder} was trained with model.image_aspect=anyres (it has "
                        "an image_newline), this model reads images with pad; set "
                        "model.image_aspect=anyres to use it")
    # A pad projector under an anyres model (LLaVA-NeXT's stage 2 after a LLaVA-1.5 stage 1):
    # the newline starts fresh.
    projector.load_state_dict(state, strict=NEWLINE in state or projector.image_newline is None)
