"""`llava-tune plot`: loss curves of one or more runs in one PNG, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from llava_tune.cli import main
from llava_tune.training.plot import LossPlotter

# matplotlib's first two cycle colors: run 1 and run 2 of an overlay.
C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


def write_run(run_dir: Path, losses: list[float], eval_every: int = 0) -> Path:
    run_dir.mkdir(parents=True)
    lines = []
    for step, loss in enumerate(losses, start=1):
        lines.append({"step": step, "loss": loss, "lr": 1e-3 * step / len(losses)})
        if eval_every and step % eval_every == 0:
            lines.append({"step": step, "eval_loss": loss + 0.1})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run_dir / "metrics.jsonl").write_text(text + '{"step": 99, "lo')  # a line cut by a crash
    return run_dir


def pixels_of(png: Path, color: tuple[int, int, int], tolerance: int = 8) -> int:
    """How many pixels of the image are (nearly) `color`."""
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(image - np.array(color)).max(axis=-1) <= tolerance).sum())


def test_plot_overlays_runs_in_their_own_colors(tmp_path, capsys):
    one = write_run(tmp_path / "stage1", [3.0, 2.0, 1.5, 1.2, 1.0], eval_every=2)
    two = write_run(tmp_path / "stage2", [1.0, 0.6, 0.4, 0.3, 0.25])
    out = tmp_path / "both.png"
    assert main(["plot", str(one), str(two), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (800, 450)
    # Both runs are drawn (a line of each color), over a mostly white page.
    assert pixels_of(out, C0) > 200 and pixels_of(out, C1) > 200
    assert pixels_of(out, (255, 255, 255), 0) > 0.5 * 800 * 450


def test_plot_of_one_run_goes_into_the_run_dir(tmp_path, capsys):
    run = write_run(tmp_path / "run", [2.0, 1.0, 0.5])
    assert main(["plot", str(run)]) == 0
    png = run / "loss.png"
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    assert pixels_of(png, C0) > 200 and pixels_of(png, C1) == 0  # one run, one color


def test_plot_refuses_what_is_not_a_run_and_a_folder_as_out(tmp_path, capsys):
    run = write_run(tmp_path / "run", [2.0, 1.0])
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(run), str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty'} has no metrics.jsonl to plot" in err
    assert not (tmp_path / "x.png").exists()
    assert main(["plot", str(run), "--out", str(tmp_path)]) == 2
    assert "is a directory; give a .png file name" in capsys.readouterr().err


def test_the_trainer_draws_its_plot_in_a_child_process(tmp_path):
    """LossPlotter runs `python -m llava_tune.training.plot RUN`: the training process never
    imports matplotlib (37 MB of peak memory in a run with checkpoints), and a failed drawing
    is reported, not lost."""
    import subprocess
    import sys

    run = write_run(tmp_path / "run", [2.0, 1.0, 0.5])
    plotter = LossPlotter(run)
    plotter.update()  # a checkpoint's redraw: started, not waited for
    assert plotter.child is not None and plotter.child.args[1:3] == ["-m", "llava_tune.training.plot"]
    assert plotter.finish() is None and plotter.child is None
    assert pixels_of(run / "loss.png", C0) > 200
    # The same module run on its own, without torch or matplotlib loaded by the import.
    code = ("import sys, llava_tune.training.plot; "
            "print(sorted({'torch', 'matplotlib'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
    # A drawing that fails (here: loss.png is a folder) comes back as the child's error.
    (run / "loss.png").unlink()
    (run / "loss.png").mkdir()
    error = plotter.finish()
    assert error and "loss.png" in error


def test_a_failed_final_plot_is_a_warning_after_the_weights(capsys):
    from llava_tune.cli.train_printer import TrainPrinter
    from llava_tune.training.events import Finished

    TrainPrinter(bar=False)(Finished(3, 0.5, Path("RUN"), 0, ["projector"],
                                     ["RUN/loss.png not drawn: disk full"]))
    err = capsys.readouterr().err
    assert "[done] 3 steps" in err and "  warning: RUN/loss.png not drawn: disk full" in err
