"""Weight files on disk: finding a checkpoint's files, reading them safely, writing safetensors.

One home for "safetensors, or a .bin read weights-only", so every loader gives the same clear
message for a truncated download or a pickle that carries code.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from llava_tune.errors import UserError
from llava_tune.files import read_json

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def load_weights(file: str | os.PathLike, device: str = "cpu",
                 nested: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one weights file: safetensors, or a PyTorch .bin read weights-only.

    A .bin is a pickle, and unpickling arbitrary objects runs code, so only tensors and plain
    containers are accepted. A truncated or corrupt file, or a pickle that holds anything else,
    raises UserError naming the file and the fix. `nested`: a .bin that is a dict with this key
    (a training checkpoint: {"epoch": ..., "state_dict": {...}, ...}) gives that entry.
    """
    file = Path(file)
    if not file.is_file():
        raise UserError(f"weights file {file} not found")
    if file.suffix == ".safetensors":
        try:
            return load_file(file, device=device)
        except (SafetensorError, OSError, ValueError) as err:
            raise _corrupt(file, err) from err
    try:
        state = torch.load(file, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{file} holds pickled objects other than tensors; llava-tune refuses to "
                        "load it, since unpickling can run code. Convert it to safetensors with "
                        "a tool you trust, or use a safetensors copy") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(f"{file} is not a readable PyTorch weights file ({err}); it is truncated "
                        "or corrupt: copy or export it again") from err
    if nested is not None and isinstance(state, dict) and isinstance(state.get(nested), dict):
        state = state[nested]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{file} does not hold a flat dict of tensors (a state dict)")
    return state


def _corrupt(file: Path, err: Exception) -> UserError:
    return UserError(f"{file} is not a readable safetensors file ({err}); it is truncated or "
                     "corrupt: copy or export it again")


@contextmanager
def open_safetensors(file: Path) -> Iterator:
    """safetensors' lazy reader (`keys()`, `get_tensor(key)`: only the tensors asked for are
    read), with a corrupt file reported as UserError."""
    try:
        with safe_open(str(file), framework="pt") as reader:
            yield reader
    except (SafetensorError, OSError) as err:
        raise _corrupt(file, err) from err


def safetensors_keys(file: Path) -> list[str]:
    """The tensor names of a safetensors file, in the file's order (its header alone is read)."""
    with open_safetensors(file) as reader:
        return list(reader.keys())


def read_safetensors(file: Path, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for each of `keys`, each tensor a copy that owns its memory.

    safetensors maps the whole file while it is open, and every page read stays in the
    process's memory until it closes; so each tensor is read in an opening of its own, and
    reading a model costs its size once, not twice (~1 ms an opening: 0.3 s for a ViT-L's 296
    tensors). Copies, not views of the mapping: a file replaced later never changes them.
    """
    for key in keys:
        with open_safetensors(file) as reader:
            yield key, reader.get_tensor(key).clone()


def check_weight_file(file: Path) -> None:
    """Raise UserError (naming the file and the fix) when a weights file cannot be read:
    a safetensors file whose header is damaged or that is shorter than its header says (read
    lazily: the tensors stay on disk), or a .bin that is corrupt or holds a pickle of anything
    but tensors. For when a library's own loader failed on the file with its own error."""
    if not file.is_file():
        raise UserError(f"weights file {file} not found")
    if file.suffix == ".safetensors":
        with open_safetensors(file):
            return
    load_weights(file)


def load_first_weights(folder: Path, names: tuple[str, ...]) -> tuple[Path, dict[str, torch.Tensor]]:
    """The first of `names` present in `folder`, loaded with `load_weights`."""
    for name in names:
        if (folder / name).is_file():
            return folder / name, load_weights(folder / name)
    raise UserError(f"no weights in {folder}: expected {' or '.join(names)}")


def _shards_from_index(path: Path, index_name: str) -> list[str]:
    index_path = path / index_name
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise UserError(f"{index_path} is not a valid shard index (no weight_map); "
                        "re-download the checkpoint")
    shards = list(dict.fromkeys(weight_map.values()))
    for shard in shards:
        if not (path / shard).is_file():
            raise UserError(
                f"{shard} listed in {index_name} is missing in {path}; re-download the checkpoint"
            )
    return shards


def checkpoint_files(path: Path) -> list[Path]:
    """Weight files of the checkpoint in `path`, in load order, all present: a single
    `model.safetensors` / `pytorch_model.bin` or the shards of their index."""
    if (path / SAFE_WEIGHTS).is_file():
        return [path / SAFE_WEIGHTS]
    if (path / SAFE_INDEX).is_file():
        return [path / name for name in _shards_from_index(path, SAFE_INDEX)]
    if (path / BIN_WEIGHTS).is_file():
        return [path / BIN_WEIGHTS]
    if (path / BIN_INDEX).is_file():
        return [path / name for name in _shards_from_index(path, BIN_INDEX)]
    present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise UserError(
        f"no model weights in {path}: expected {SAFE_WEIGHTS} or {BIN_WEIGHTS} (or a sharded "
        f"index of either); found {present}; point to a complete checkpoint folder or "
        "re-download it"
    )


def iter_checkpoint_shards(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield (shard file name, its state dict on the CPU), one shard at a time.

    Every listed shard is checked before the first is read, so a broken download fails before
    any work.
    """
    for file in checkpoint_files(Path(path)):
        yield file.name, load_weights(file)


def save_safetensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Save tensors as safetensors (CPU, contiguous); tensors that share storage (tied weights,
    views of one buffer), which safetensors refuses, are cloned."""
    seen: set[int] = set()
    ready = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        ready[key] = tensor
    save_file(ready, file, metadata={"format": "pt"})


def write_json(file: Path, data: object) -> None:
    """Pretty JSON with a final newline (for files inside a folder being written atomically)."""
    file.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
