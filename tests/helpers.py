"""Plain helpers the tests share (the fixtures are in conftest.py): the command line through
`main(argv)`, and the key=value overrides that point a config at the tiny fixtures and keep
its training small. `from helpers import ...`: pyproject.toml puts tests/ on sys.path."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from llava_tune.cli import main

SMALL = ["train.batch_size=4", "data.max_length=64", "train.warmup_ratio=0"]
"""A small, quick training run: what every test that trains on the tiny fixtures starts from."""

LOGGED = [*SMALL, "train.log_every=1"]
"""SMALL, with a metrics row (and a progress line) for every step."""

STAGE_DATA = {"lm": "text.json", "sft": "text.json", "pretrain": "pretrain.json",
              "finetune": "finetune.json"}
"""The shapes data file each demo stage config trains on."""


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`llava-tune ARGV` (each item str()'d): exit code, stdout and stderr of this call alone."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_model(tiny_lm: Path, tiny_vision: tuple[Path, Path]) -> list[str]:
    """Overrides that make a config's model the tiny LM and the tiny ViT."""
    return [f"model.llm={tiny_lm}", "model.vision.name=tiny-vit",
            f"model.vision.config_file={tiny_vision[0]}",
            f"model.vision.pretrained={tiny_vision[1]}"]


def fixture_overrides(stage_file: str, tiny_lm: Path, tiny_vision: tuple[Path, Path],
                      shapes_data: Path, run_dir: Path) -> list[str]:
    """tiny_model, the shapes data the demo config `stage_file` trains on, and run_dir."""
    return [*tiny_model(tiny_lm, tiny_vision), f"data.train={shapes_data / STAGE_DATA[stage_file]}",
            f"data.image_folder={shapes_data / 'images'}", f"run_dir={run_dir}"]


def overrides_in(folder: Path, tiny_lm: Path, tiny_vision: tuple[Path, Path], shapes_data: Path):
    """`overrides(stage_file, run="run")`: fixture_overrides with the run dir folder/run,
    logged every step (conftest's stage_overrides, in tmp_path)."""

    def overrides(stage_file: str, run: str = "run") -> list[str]:
        return [*fixture_overrides(stage_file, tiny_lm, tiny_vision, shapes_data, folder / run),
                "train.log_every=1"]

    return overrides


def kill_launch(proc: subprocess.Popen) -> None:
    """kill -9 a torchrun launch: the launcher and its workers. torchrun starts each worker in
    a session of its own, so killing the launcher's process group leaves them running (they
    would finish the run unseen); each is killed here by its pid, read from /proc first."""
    workers = [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
               if _parent(stat) == proc.pid]
    assert workers, "the launch has no workers to kill"
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in workers):
        assert time.time() < deadline, "the workers outlived kill -9"
        time.sleep(0.05)


def _parent(stat: Path) -> int | None:
    try:  # "pid (name) state ppid ...": the name may hold spaces, so split after its ")"
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
