"""The run directory: what every command reads and writes, and the rules that keep it safe.

    RUN_DIR/
      config.yaml      resolved config                        (written first)
      projector/       when the stage has a vision tower
      llm_adapter/     LoRA on the LLM (trained, or carried over from init_from)
      llm/             the fully trained LLM
      vision_adapter/  LoRA on the vision tower
      vision/          the fully trained vision tower
      metrics.jsonl    one line per logged step (and per evaluation)
      loss.png         the loss curve
      checkpoints/     resumable state, step-NNNNNNN/
      COMPLETE         written last, atomically: the final weights are all there
      .lock            held while a training runs in this folder

A run without COMPLETE was killed or is still training: it never loads by mistake.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from llava_tune.config import Config, config_from_dict, config_to_yaml
from llava_tune.errors import UserError
from llava_tune.files import write_text_atomic

CONFIG = "config.yaml"
PROJECTOR = "projector"
LLM_ADAPTER = "llm_adapter"
LLM = "llm"
VISION_ADAPTER = "vision_adapter"
VISION = "vision"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
LOCK = ".lock"

WEIGHT_PARTS = (PROJECTOR, LLM, LLM_ADAPTER, VISION, VISION_ADAPTER)
"""Folders of final weights, in the order they are loaded (full weights before a LoRA on
them)."""
WRITTEN_BY_TRAINING = (CONFIG, *WEIGHT_PARTS, METRICS, LOSS_PLOT, CHECKPOINTS, COMPLETE)
"""Everything a training writes into its run dir: what --overwrite may replace."""


def read_run_config(run_dir: str | os.PathLike) -> Config:
    """The config a run was trained with; a missing or damaged config.yaml raises UserError."""
    run_dir = Path(run_dir)
    file = run_dir / CONFIG
    if not file.is_file():
        raise UserError(f"{run_dir} is not a llava-tune run dir: {file} is missing")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{file} is not UTF-8 text; the run dir is damaged: restore config.yaml "
                        "from a backup or train again") from None
    except yaml.YAMLError as err:
        raise UserError(f"{file} is not valid YAML ({err}); the run dir is damaged: restore "
                        "config.yaml from a backup or train again") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} does not hold a config mapping; the run dir is damaged")
    return config_from_dict(data, source=file)


def save_config(run_dir: Path, config: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG, config_to_yaml(config))


def mark_complete(run_dir: Path, parts: list[str], steps: int) -> None:
    """Written last, after every weight folder: the run is finished and loadable."""
    record = {"parts": parts, "steps": steps, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text_atomic(run_dir / COMPLETE, json.dumps(record, indent=2) + "\n")


def completed_parts(run_dir: Path) -> list[str] | None:
    """The weight folders a finished run wrote, or None when it is not finished."""
    file = run_dir / COMPLETE
    if not file.is_file():
        return None
    try:
        return list(json.loads(file.read_text(encoding="utf-8"))["parts"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{file} is damaged; if the run finished, its weights are still there: "
                        f"write {file} again as {{\"parts\": [...], \"steps\": N}}") from None


def check_complete(run_dir: Path) -> list[str]:
    """The weight folders of a finished run, all present; raises UserError with what to do for
    a run that never finished or lost a part."""
    parts = completed_parts(run_dir)
    if parts is None:
        checkpoints = sorted((run_dir / CHECKPOINTS).glob("step-*"))
        hint = (f" Its newest checkpoint is {checkpoints[-1]}: continue the training with "
                f"`llava-tune train {run_dir / CONFIG} train.resume=true`, or load that "
                "checkpoint folder instead of the run dir." if checkpoints else
                " It has no checkpoint either: train it again.")
        raise UserError(f"{run_dir} holds no finished run (no {COMPLETE} marker): the training "
                        f"was interrupted or is still running, so its final weights are "
                        f"missing or incomplete.{hint}")
    missing = [part for part in parts if not (run_dir / part).is_dir()]
    if missing:
        raise UserError(f"{run_dir} is missing {', '.join(p + '/' for p in missing)}, which its "
                        f"training wrote ({COMPLETE} lists them); restore the folder(s) from a "
                        "backup, or train again")
    return parts


# --------------------------------------------------------------------------- training's side


class RunLock:
    """An exclusive lock file in a run dir, naming the holder's pid and host.

    A second training in the same folder fails at once, naming the holder. A lock left by a
    process that no longer exists (killed) is taken over.
    """

    def __init__(self, run_dir: Path) -> None:
        self.file = run_dir / LOCK
        self.held = False

    def acquire(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(2):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._alive(holder):
                    raise UserError(
                        f"another training (pid {holder.get('pid')} on {holder.get('host')}) is "
                        f"running in {self.file.parent}; wait for it, stop it, or choose "
                        "another run_dir") from None
                self.file.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record)
            self.held = True
            return
        raise UserError(f"could not take the lock {self.file}; remove it if no training runs there")

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.file.read_text())
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None  # being written right now, or damaged: treat as stale on the retry

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # another machine's process: cannot check, assume it runs
        try:
            os.kill(int(holder["pid"]), 0)
        except (ProcessLookupError, KeyError, ValueError, TypeError):
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        if self.held:
            self.file.unlink(missing_ok=True)
            self.held = False


@dataclass
class RunDirState:
    """What a training found in its run dir before starting."""

    finished: bool
    checkpoints: list[Path]
    other_files: list[str]


def inspect_run_dir(run_dir: Path) -> RunDirState:
    if not run_dir.is_dir():
        return RunDirState(False, [], [])
    return RunDirState(
        finished=(run_dir / COMPLETE).is_file(),
        checkpoints=sorted((run_dir / CHECKPOINTS).glob("step-*")),
        other_files=sorted(p.name for p in run_dir.iterdir()
                           if p.name not in WRITTEN_BY_TRAINING and p.name != LOCK
                           and not p.name.startswith(".")),
    )


def prepare_for_training(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to destroy a run: a finished run or another run's checkpoints need
    `train.resume=true` (continue) or `--overwrite` (start again); resume needs a checkpoint.

    With `overwrite`, only what a training writes is removed (never the user's own files).
    Also removes temp folders that a killed process left behind. Call with the lock held.
    """
    state = inspect_run_dir(run_dir)
    if resume and overwrite:
        raise UserError("train.resume=true and --overwrite contradict each other; pick one")
    if resume and not state.checkpoints:
        raise UserError(f"train.resume=true, but {run_dir / CHECKPOINTS} holds no checkpoint to "
                        f"continue from (set train.save_every=N to write them); start afresh "
                        "without train.resume (add --overwrite if the folder holds a run)")
    if not resume and not overwrite and (state.finished or state.checkpoints):
        what = "a finished run" if state.finished else (
            f"the checkpoints of another run (newest {state.checkpoints[-1].name})")
        raise UserError(f"{run_dir} already holds {what}; continue it with train.resume=true, "
                        "replace it with `llava-tune train ... --overwrite`, or choose another "
                        "run_dir")
    if overwrite:
        for name in WRITTEN_BY_TRAINING:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    remove_stale_temp(run_dir)


def remove_stale_temp(run_dir: Path) -> None:
    """Temp folders and files of atomic writes (`.NAME.tmp-*`, `.NAME.old-*`) that a killed
    process left; only ours, by their name pattern, and only with the run's lock held."""
    for folder in (run_dir, run_dir / CHECKPOINTS):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(".") and (".tmp-" in path.name or ".old-" in path.name
                                              or path.name.endswith(".tmp")):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
