"""Loss plots: RUN/loss.png after each checkpoint and at the end, and several runs overlaid.

The trainer draws its plot in a child process (`LossPlotter`): drawn in the training
process after a checkpoint, matplotlib stays loaded for the rest of the run and raised its peak
resident memory by 37 MB (measured: the demo's stage-2 config, 40 steps of batch 8, a checkpoint
every 10: 1,143 MB in-process, 1,106 MB with the child; a run without checkpoints drew only at
the end and peaked the same either way), and each redraw paused training. The child reads only
metrics.jsonl; this module imports neither torch nor matplotlib at the top.

    python -m llava_tune.training.plot RUN_DIR     # what the child runs: RUN_DIR/loss.png
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from llava_tune import rundir
from llava_tune.errors import UserError
from llava_tune.files import write_bytes_atomic
from llava_tune.training.metrics import read_metrics


def plot_runs(run_dirs: list[Path], out: Path, title: str | None = None) -> Path:
    """Train loss (solid), eval loss (dots) of each run, and the learning rate on a second axis
    (dashed), one color per run. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    metrics = {}
    for run_dir in run_dirs:
        file = Path(run_dir) / rundir.METRICS
        if not file.is_file():
            raise UserError(f"{run_dir} has no {rundir.METRICS} to plot; is it a run dir?")
        metrics[run_dir] = read_metrics(file)
    # Preference runs get a second panel: the reward margin and accuracy.
    preference = any("rewards/margin" in r for records in metrics.values() for r in records)
    if preference:
        fig, (ax, reward_ax) = plt.subplots(2, 1, figsize=(8, 7), dpi=100, sharex=True)
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    lr_ax = ax.twinx()
    for i, run_dir in enumerate(run_dirs):
        records = metrics[run_dir]
        color = f"C{i}"
        label = Path(run_dir).name if len(run_dirs) > 1 else "train loss"
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        lrs = [(r["step"], r["lr"]) for r in records if "lr" in r]
        if train:
            ax.plot(*zip(*train, strict=True), color=color, label=label)
        if evals:
            ax.plot(*zip(*evals, strict=True), "o:", color=color,
                    label=f"{label} eval" if len(run_dirs) > 1 else "eval loss")
        if lrs:
            lr_ax.plot(*zip(*lrs, strict=True), "--", color=color, alpha=0.4, linewidth=1)
        if preference:
            for key, style in (("rewards/margin", "-"), ("rewards/accuracy", ":")):
                points = [(r["step"], r[key]) for r in records if key in r]
                if points:
                    reward_ax.plot(*zip(*points, strict=True), style, color=color,
                                   label=key if len(run_dirs) == 1 else f"{label} {key}")
    if preference:
        reward_ax.set_xlabel("optimizer step")
        reward_ax.set_ylabel("reward margin, accuracy")
        reward_ax.grid(alpha=0.3)
        reward_ax.legend(loc="lower right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    lr_ax.set_ylabel("learning rate (dashed)")
    ax.set_title(title or ", ".join(Path(r).name for r in run_dirs))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes_atomic(out, buffer.getvalue())
    return out


def write_loss_plot(run_dir: Path) -> Path | None:
    """RUN/loss.png from the run's metrics so far (none before the first log line)."""
    metrics = run_dir / rundir.METRICS
    if not metrics.is_file() or not read_metrics(metrics):
        return None
    return plot_runs([run_dir], run_dir / rundir.LOSS_PLOT, title=f"{run_dir.name}")


class LossPlotter:
    """RUN/loss.png for a training run, drawn by `python -m llava_tune.training.plot RUN` in
    the background; one child at a time."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.child: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "llava_tune.training.plot",
                                 str(self.run_dir)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def update(self) -> None:
        """Redraw after a checkpoint, without waiting. A redraw still running is left to
        finish: the next one (or `finish`) draws the newer metrics anyway."""
        if self.child is None or self.child.poll() is not None:
            self.wait()
            self.child = self._start()

    def wait(self) -> str | None:
        """Wait for the running redraw, if any; its error output when it failed."""
        child, self.child = self.child, None
        if child is None:
            return None
        _, err = child.communicate()
        return None if child.returncode == 0 else (err.decode(errors="replace").strip()
                                                   or f"exit status {child.returncode}")

    def finish(self) -> str | None:
        """The final plot, waited for: None when RUN/loss.png is drawn, else why not."""
        self.wait()
        self.child = self._start()
        return self.wait()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m llava_tune.training.plot RUN_DIR", file=sys.stderr)
        return 2
    write_loss_plot(Path(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
