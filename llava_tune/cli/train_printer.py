"""Drawing a training run's events on stderr: a header, one progress bar, a closing line."""

from __future__ import annotations

import sys

from llava_tune.training.events import (
    CheckpointSaved,
    Evaluated,
    Event,
    Finished,
    Interrupted,
    Logged,
    SampleSkipped,
    Started,
)

MAX_SKIPS_SHOWN = 5


class TrainPrinter:
    """on_event for `train`; with `bar=False` (not a terminal, or --quiet) log lines replace
    the bar."""

    def __init__(self, bar: bool = True) -> None:
        self.use_bar = bar
        self.bar = None
        self.skips = 0
        self.postfix: dict[str, str] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, Started):
            self.started(event)
        elif isinstance(event, Logged):
            self.postfix.update(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}",
                                tok_s=f"{event.tokens_per_s:.0f}")
            # MFU where the GPU's peak is known, else the model TFLOP/s per process.
            if event.mfu is not None:
                self.postfix["mfu"] = f"{event.mfu:.1%}"
                use = f"{event.mfu:.1%} MFU"
            else:
                self.postfix["tflops"] = f"{event.tflops:.3g}"
                use = f"{event.tflops:.3g} TFLOP/s"
            rewards = ""
            if event.rewards is not None:
                self.postfix.update(margin=f"{event.rewards['rewards/margin']:.3f}",
                                    acc=f"{event.rewards['rewards/accuracy']:.2f}")
                rewards = f" {_rewards(event.rewards)}"
            self.advance(event.step, f"step {event.step}/{event.total_steps} loss "
                          f"{event.loss:.4f} lr {event.lr:.2e} {event.tokens_per_s:.0f} tok/s "
                          f"{use}{rewards}")
        elif isinstance(event, Evaluated):
            self.postfix["eval"] = f"{event.eval_loss:.4f}"
            rewards = f" held-out {_rewards(event.rewards)}" if event.rewards else ""
            self.advance(event.step, f"step {event.step} eval_loss {event.eval_loss:.4f}"
                         f"{rewards}")
        elif isinstance(event, CheckpointSaved):
            self.write(f"  checkpoint {event.path}")
        elif isinstance(event, SampleSkipped):
            self.skips += 1
            if self.skips <= MAX_SKIPS_SHOWN:
                self.write(f"  skipped {event.sample_id}: {event.reason}")
        elif isinstance(event, Interrupted):
            self.close()
            machines = (f" (on each of the {event.machines} machines, MAIN_HOST the main "
                        "one's address)" if event.machines > 1 else "")
            where = (f"checkpoint {event.checkpoint} written; continue with{machines}:\n  "
                     f"{event.resume_command}" if event.checkpoint else
                     "no checkpoint was written (train.save_every is not set), so the run "
                     "cannot be resumed and its final weights were not saved; start it again "
                     "with the same command (add train.save_every=N to be able to resume)")
            print(f"[interrupted] at step {event.step}: {where}", file=sys.stderr)
        elif isinstance(event, Finished):
            self.close()
            if event.skipped:
                print(f"  {event.skipped} samples skipped at load time", file=sys.stderr)
            for warning in event.warnings:
                print(f"  warning: {warning}", file=sys.stderr)
            print(f"[done] {event.steps} steps, last loss {event.loss:.4f}, weights "
                  f"({', '.join(event.parts)}) in {event.run_dir}", file=sys.stderr)
            if event.rewards is not None:
                print(f"  over the run's pairs: {_rewards(event.rewards)}", file=sys.stderr)

    def started(self, event: Started) -> None:
        vision = f", vision tower {event.vision}" if event.vision else ""
        procs = f" x {event.processes} processes" if event.processes > 1 else ""
        procs += f" on {event.machines} machines" if event.machines > 1 else ""
        print(f"[{event.stage}] run dir {event.run_dir} on {event.device}{procs}, "
              f"LLM {event.llm}{vision}", file=sys.stderr)
        if event.carried:
            print(f"  from init_from: {', '.join(event.carried)}", file=sys.stderr)
        for note in event.notes:
            print(f"  {note}", file=sys.stderr)
        for name, (trainable, total) in event.parameters.items():
            print(f"  {name:9s} {trainable:>13,} trainable of {total:>13,}", file=sys.stderr)
        print("  data: " + event.data.summary().replace("\n", "\n  "), file=sys.stderr)
        if event.eval_data is not None:
            print("  eval data: " + event.eval_data.summary().replace("\n", "\n  "),
                  file=sys.stderr)
        if self.use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=event.total_steps, initial=event.step, unit="step",
                            file=sys.stderr, dynamic_ncols=True, mininterval=1.0)

    def advance(self, step: int, line: str) -> None:
        """Move the bar to `step`; without a bar, print `line`."""
        if self.bar is None:
            print(f"  {line}", file=sys.stderr)
            return
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(step - self.bar.n)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _rewards(rewards: dict[str, float]) -> str:
    """rewards/... metrics as one short line: accuracy, margin, chosen, rejected."""
    return (f"reward accuracy {rewards['rewards/accuracy']:.3f} margin "
            f"{rewards['rewards/margin']:.3f} (chosen {rewards['rewards/chosen']:.3f}, "
            f"rejected {rewards['rewards/rejected']:.3f})")
