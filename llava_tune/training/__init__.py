"""Training, for every stage:

    train(config) = setup(config) -> Run, then fit(run)

setup.py builds a run (checks, run dir and its lock, model, data, optimizer, resume state),
loop.py trains it; the loop never builds and setup never trains. events.py is what a run
reports, checkpoint.py and metrics.py what it writes, plot.py its loss curve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llava_tune.config import Config
    from llava_tune.training.events import OnEvent
    from llava_tune.training.loop import TrainResult


def train(config: Config, on_event: OnEvent = lambda event: None,
          overwrite: bool = False) -> TrainResult:
    """Train one stage as `config` says and write its run dir."""
    # Imported here: `python -m llava_tune.training.plot` (the loss plot's child process)
    # imports this package and must not load torch.
    from llava_tune.training.loop import fit
    from llava_tune.training.setup import setup

    run = setup(config, overwrite=overwrite)
    try:
        return fit(run, on_event)
    finally:
        run.close()
