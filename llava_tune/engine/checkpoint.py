"""Run-directory I/O: final weights and resumable checkpoints, all written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file, save_file

from llava_tune.config import Config, config_to_yaml
from llava_tune.files import atomic_dir, write_text_atomic
from llava_tune.models.llava import LlavaModel


def save_config(run_dir: Path, config: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", config_to_yaml(config))


def save_weights(run_dir: Path, model: LlavaModel, tokenizer, llm_mode: str) -> None:
    """What later stages, chat and export need: projector/, llm_adapter/ (LoRA) or llm/
    (fully trained LLM, with its tokenizer)."""
    if model.projector is not None:
        model.projector.save(run_dir / "projector")
    if isinstance(model.llm, peft.PeftModel):
        with atomic_dir(run_dir / "llm_adapter") as tmp:
            model.llm.save_pretrained(tmp)
    elif llm_mode == "full":
        with atomic_dir(run_dir / "llm") as tmp:
            model.llm.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer, scheduler,
                    state: dict, keep: int) -> Path:
    """checkpoints/step-N/: trainable weights, optimizer, scheduler, RNG and data position."""
    target = run_dir / "checkpoints" / f"step-{step:07d}"
    with atomic_dir(target) as tmp:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for old in sorted((run_dir / "checkpoints").glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restore what `save_checkpoint` wrote; returns its state dict (step, epoch, batch)."""
    weights = load_file(path / "trainable.safetensors")
    missing = model.load_state_dict(weights, strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"checkpoint {path} has weights this model lacks: {missing.unexpected_keys[:3]}")
    # Our own file, written by save_checkpoint: tensors, numbers and dicts only.
    blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    return json.loads((path / "state.json").read_text())
