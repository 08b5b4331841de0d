"""What a training writes into its run dir: final weights (then the COMPLETE marker) and
resumable checkpoints, all written atomically."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import peft
import torch
from safetensors.torch import save_file

from llava_tune import rundir
from llava_tune.assembly.model import ModelBundle, check_trainable_state
from llava_tune.convert.projector import save_projector
from llava_tune.convert.weights import load_weights
from llava_tune.errors import UserError
from llava_tune.files import atomic_dir, read_json
from llava_tune.stages import llm_mode


def save_weights(run_dir: Path, model: torch.nn.Module, bundle: ModelBundle,
                 steps: int) -> list[str]:
    """Every part the model carries that the base weights lack, then the COMPLETE marker:
    projector/, llm_adapter/ or llm/ (with its tokenizer), vision_adapter/, vision/."""
    parts = []
    if model.projector is not None:
        save_projector(model.projector, run_dir / rundir.PROJECTOR)
        parts.append(rundir.PROJECTOR)
    if isinstance(model.llm, peft.PeftModel):
        with atomic_dir(run_dir / rundir.LLM_ADAPTER) as tmp:
            model.llm.save_pretrained(tmp)
        parts.append(rundir.LLM_ADAPTER)
    elif llm_mode(bundle.config) == "full":
        with atomic_dir(run_dir / rundir.LLM) as tmp:
            model.llm.save_pretrained(tmp)
            bundle.tokenizer.save_pretrained(tmp)
        parts.append(rundir.LLM)
    if model.vision is not None:
        tower = model.vision
        if bundle.tower_changed or (not isinstance(tower.visual, peft.PeftModel) and tower.trains):
            with atomic_dir(run_dir / rundir.VISION) as tmp:
                state = {k: v.detach().cpu().contiguous() for k, v in tower.base.state_dict().items()
                         if "lora_" not in k}
                save_file({k.replace(".base_layer.", "."): v for k, v in state.items()},
                          tmp / "model.safetensors")
            parts.append(rundir.VISION)
        if isinstance(tower.visual, peft.PeftModel):
            with atomic_dir(run_dir / rundir.VISION_ADAPTER) as tmp:
                tower.visual.save_pretrained(tmp)
            parts.append(rundir.VISION_ADAPTER)
    rundir.mark_complete(run_dir, parts, steps)
    return parts


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer, scheduler,
                    state: dict, keep: int) -> Path:
    """checkpoints/step-N/: trainable weights, optimizer, scheduler, RNG and data position."""
    target = run_dir / rundir.CHECKPOINTS / f"step-{step:07d}"
    with atomic_dir(target) as tmp:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for old in sorted((run_dir / rundir.CHECKPOINTS).glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / rundir.CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restore what `save_checkpoint` wrote; returns its state dict (step, epoch, batch).
    The checkpoint must hold exactly the model's trainable weights."""
    weights = load_weights(path / "trainable.safetensors")
    check_trainable_state(model, weights, path)
    model.load_state_dict(weights, strict=False)
    # Our own file, written by save_checkpoint: tensors, numbers and dicts only.
    try:
        blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise UserError(f"checkpoint {path} is damaged ({path / 'optimizer.pt'}: "
                        f"{str(err).strip().splitlines()[0].split('. ')[0]}); delete {path} "
                        "to resume from the checkpoint before it") from err
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    return read_json(path / "state.json", "checkpoint state",
                     f"the checkpoint is damaged: delete {path} to resume from the one before")
