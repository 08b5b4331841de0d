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

import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from llava_tune.config import Config, config_from_dict, config_to_yaml, yaml_problem
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
REFERENCE = "reference"
"""Stage dpo's precomputed reference log-probabilities, without data.cache_dir."""

WEIGHT_PARTS = (PROJECTOR, LLM, LLM_ADAPTER, VISION, VISION_ADAPTER)
"""Folders of final weights, in the order they are loaded (full weights before a LoRA on
them)."""
WRITTEN_BY_TRAINING = (CONFIG, *WEIGHT_PARTS, METRICS, LOSS_PLOT, CHECKPOINTS, REFERENCE,
                       COMPLETE)
"""Everything a training writes into its run dir: what --overwrite may replace."""
CONFIG_HEADER = "# llava-tune run config: the resolved settings of the training in this folder\n"
"""First line of the config.yaml a training writes, so a user's own config.yaml in a folder
chosen as run_dir is told apart from ours (and never overwritten)."""


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
        raise UserError(f"{file} is not valid YAML ({yaml_problem(err)}); the run dir is "
                        "damaged: restore config.yaml from a backup or train again") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} does not hold a config mapping; the run dir is damaged")
    return config_from_dict(data, source=file)


def save_config(run_dir: Path, config: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG, CONFIG_HEADER + config_to_yaml(config))


def resume_command(run_dir: Path, launcher: str = "llava-tune") -> str:
    """The command that continues the run in `run_dir` from its newest checkpoint: its own
    config.yaml holds every setting it was started with (overrides included, paths absolute),
    so it works from any working directory."""
    return f"{launcher} train {shlex.quote(str(Path(run_dir).resolve() / CONFIG))} train.resume=true"


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
                f"`{resume_command(run_dir)}`, or load that checkpoint folder instead of the "
                "run dir." if checkpoints else
                " It has no checkpoint either: train it again with the same command.")
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
    """An exclusive lock on a file in the run dir, which names the holder's pid and host.

    The kernel's lock (flock) is what excludes: a second training in the same folder fails at
    once, naming the holder; a lock file left by a killed process holds no lock any more and
    is simply taken over. (A pid check instead would race: two processes could both find a
    lock "stale" and both take it.)
    """

    def __init__(self, run_dir: Path) -> None:
        self.file = run_dir / LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        for _ in range(10):
            fd = os.open(self.file, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self._holder()
                who = (f"pid {holder.get('pid')} on {holder.get('host')}" if holder
                       else "a process that is starting")
                raise UserError(
                    f"another training ({who}) is running in {self.file.parent}; wait for it "
                    "to finish, stop it, or choose another run_dir") from None
            except OSError as err:
                os.close(fd)
                raise UserError(f"cannot lock {self.file} ({err}); put run_dir on a filesystem "
                                "that supports file locks") from None
            # The previous holder unlinks the file before unlocking it: when that happened
            # between our open and our lock, we hold a file nobody else sees; take the new one.
            try:
                current = os.stat(self.file)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is None or (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, record)
            self._fd = fd
            return
        raise UserError(f"could not take the lock {self.file}; another process keeps replacing "
                        "it: make sure no other training uses this run_dir")

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.file.read_text())
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None  # being written right now

    def release(self) -> None:
        if self._fd is not None:
            # Unlink before unlocking: a process waiting on this file then sees it is gone.
            self.file.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


@dataclass
class RunDirState:
    """What a training found in its run dir before starting."""

    finished: bool
    checkpoints: list[Path]
    other_files: list[str]
    """The user's own files (never touched)."""
    foreign: list[str]
    """Names a training writes (config.yaml, projector/, ...) present in a folder that holds no
    llava-tune run: someone else's files, which a training would overwrite."""


def _ours(run_dir: Path, finished: bool, checkpoints: list[Path]) -> bool:
    """Whether the folder's training-named files were written by a llava-tune training."""
    if finished or checkpoints or (run_dir / METRICS).is_file():
        return True
    try:
        with open(run_dir / CONFIG, encoding="utf-8", errors="replace") as f:
            return f.readline() == CONFIG_HEADER
    except OSError:
        return False


def inspect_run_dir(run_dir: Path) -> RunDirState:
    if not run_dir.is_dir():
        return RunDirState(False, [], [], [])
    finished = (run_dir / COMPLETE).is_file()
    checkpoints = sorted((run_dir / CHECKPOINTS).glob("step-*"))
    names = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    ours = _ours(run_dir, finished, checkpoints)
    return RunDirState(
        finished=finished, checkpoints=checkpoints,
        other_files=[n for n in names if n not in WRITTEN_BY_TRAINING],
        foreign=[] if ours else [n for n in names if n in WRITTEN_BY_TRAINING],
    )


def prepare_for_training(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to destroy a run: a finished run or another run's checkpoints need
    `train.resume=true` (continue) or `--overwrite` (start again); resume needs a checkpoint;
    files named like a run's that no training wrote are never overwritten.

    With `overwrite`, only what a training writes is removed (never the user's own files).
    Also removes temp folders that a killed process left behind. Call with the lock held.
    """
    state = inspect_run_dir(run_dir)
    if resume and overwrite:
        raise UserError("train.resume=true and --overwrite contradict each other; pick one")
    if state.foreign:
        raise UserError(
            f"run_dir {run_dir} holds {', '.join(state.foreign)}, which no llava-tune training "
            "wrote (a training writes files of these names, and would overwrite them); choose "
            f"another run_dir, e.g. {run_dir / 'run'}, or move them away")
    remove_stale_temp(run_dir)
    state.checkpoints = sorted((run_dir / CHECKPOINTS).glob("step-*"))
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


_TEMP = re.compile(r"\.(?P<name>.+?)\.(?:(?P<kind>tmp|old)-[A-Za-z0-9_]+|[A-Za-z0-9_]+\.tmp)")
"""Names of the temp files and folders of files.atomic_dir / write_bytes_atomic:
`.NAME.tmp-XXXX` (being written), `.NAME.old-XXXX/NAME` (the previous NAME, being replaced),
`.NAME.XXXX.tmp` (a file being written)."""


def remove_stale_temp(run_dir: Path) -> None:
    """Temp files and folders of atomic writes that a killed process left: only those of the
    names a training writes (and of checkpoints/step-N), and only with the run's lock held.

    A kill between the two renames of atomic_dir leaves NAME missing and its previous version
    in `.NAME.old-XXXX/NAME`: that version is put back, not deleted.
    """
    for folder, ours in ((run_dir, lambda n: n in WRITTEN_BY_TRAINING),
                         (run_dir / CHECKPOINTS, lambda n: re.fullmatch(r"step-\d+", n))):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            match = _TEMP.fullmatch(path.name)
            if match is None or not ours(match["name"]):
                continue
            target, previous = folder / match["name"], path / match["name"]
            if match["kind"] == "old" and not target.exists() and previous.exists():
                os.replace(previous, target)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
