"""What the training loop reports, as typed events; the CLI draws them, tests read them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llava_tune.data.datasets import DataReport


@dataclass
class Started:
    run_dir: Path
    stage: str
    llm: str
    vision: str | None
    parameters: dict[str, tuple[int, int]]
    """component -> (trainable, total)"""
    data: DataReport
    eval_data: DataReport | None
    total_steps: int
    step: int
    """Where the run starts (above 0 when resumed)."""
    device: str
    processes: int
    machines: int = 1
    """Machines (nodes) the processes run on."""
    carried: list[str] = field(default_factory=list)
    """Parts loaded from init_from."""
    notes: list[str] = field(default_factory=list)


@dataclass
class Logged:
    step: int
    total_steps: int
    epoch: int
    loss: float
    """Token-weighted mean over the label tokens since the last log, all processes."""
    lr: float
    tokens_per_s: float
    memory_mb: float
    tflops: float = 0.0
    """Model TFLOP/s per process (training/flops.py), over the log window."""
    mfu: float | None = None
    """tflops over the GPU's peak; None when the peak is not known."""
    rewards: dict[str, float] | None = None
    """Preference training: rewards/chosen, /rejected, /margin, /accuracy over the window's
    pairs (loss is then pair-weighted)."""


@dataclass
class Evaluated:
    step: int
    eval_loss: float
    tokens: int
    """Label tokens (preference training: pairs) the loss is averaged over."""
    rewards: dict[str, float] | None = None
    """Preference training: the held-out pairs' rewards (see Logged.rewards)."""


@dataclass
class CheckpointSaved:
    step: int
    path: Path


@dataclass
class SampleSkipped:
    """A sample that failed at load time (e.g. an unreadable image) and was left out."""

    sample_id: str
    reason: str


@dataclass
class Interrupted:
    """Ctrl-C: the loop stopped at a step boundary."""

    step: int
    checkpoint: Path | None
    resume_command: str | None
    machines: int = 1
    """Machines the run ran on: the resume command runs on each of them."""


@dataclass
class Finished:
    steps: int
    loss: float
    run_dir: Path
    skipped: int
    parts: list[str]
    warnings: list[str] = field(default_factory=list)
    """What went wrong besides the weights (which are saved), e.g. the loss plot."""
    rewards: dict[str, float] | None = None
    """Preference training: the rewards over every pair this run trained on (since it
    started or resumed)."""


Event = Started | Logged | Evaluated | CheckpointSaved | SampleSkipped | Interrupted | Finished
OnEvent = Callable[[Event], None]
