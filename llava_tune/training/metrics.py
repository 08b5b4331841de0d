"""metrics.jsonl: one JSON line per logged step or evaluation, written by the main process."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

from llava_tune.files import write_text_atomic


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch on CUDA, else this process's peak resident memory."""
    import torch  # here, so that reading metrics (the loss plot's child process) needs no torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def peak_reserved_mb() -> float | None:
    """Peak GPU memory held by torch's caching allocator on CUDA (what the card must have,
    CUDA context aside); None elsewhere."""
    import torch

    return torch.cuda.max_memory_reserved() / 2**20 if torch.cuda.is_available() else None


def peak_rss_mb() -> float:
    """This process's own peak RSS so far: VmHWM where /proc has it. getrusage's ru_maxrss
    also counts the parent's peak when the process was started by vfork + exec (Python's
    subprocess does that), so a trainer started from a 1 GB process would report at least 1 GB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
        1024 if sys.platform != "darwin" else 2**20)  # KiB on Linux, bytes on macOS


class MetricsLog:
    """Appends lines to RUN/metrics.jsonl; a resumed run first forgets the lines a crashed run
    logged after its last checkpoint, so repeated steps are not logged twice. Processes other
    than the main one write nowhere."""

    def __init__(self, file: Path, resume_step: int, main_process: bool) -> None:
        self.file = file
        if main_process and resume_step:
            drop_metrics_after(file, resume_step)
        self._out = open(file if main_process else os.devnull, "a" if resume_step else "w",
                         encoding="utf-8")

    def write(self, record: dict) -> None:
        self._out.write(json.dumps(record) + "\n")
        self._out.flush()

    def close(self) -> None:
        self._out.close()


def drop_metrics_after(file: Path, step: int) -> None:
    if not file.is_file():
        return
    kept = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the crash
    write_text_atomic(file, "".join(kept))


def read_metrics(file: Path) -> list[dict]:
    """The lines of a metrics.jsonl; a damaged line (cut by a crash) is skipped."""
    records = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records
