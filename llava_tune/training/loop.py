"""The one training loop, on accelerate, for every stage: `fit` runs the optimizer steps of a
`Run` that setup.py built (token-weighted loss over the accumulation window and all
processes, logging, validation, checkpoints, Ctrl-C, final weights). Nothing here prints: the
run's course goes out as typed events (training/events.py).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llava_tune import rundir
from llava_tune.data.collate import Batch
from llava_tune.data.datasets import DataReport
from llava_tune.launch import machines, relaunch_command
from llava_tune.training.checkpoint import save_checkpoint, save_weights
from llava_tune.training.events import (
    CheckpointSaved,
    Evaluated,
    Finished,
    Interrupted,
    Logged,
    OnEvent,
    SampleSkipped,
)
from llava_tune.training.metrics import peak_memory_mb, peak_reserved_mb
from llava_tune.training.plot import LossPlotter
from llava_tune.training.preference import reward_metrics
from llava_tune.training.setup import Run


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    data: DataReport
    skipped: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False


@dataclass
class _Window:
    """Sums over the micro-batches since the last log line (this process). The loss and the
    objective's stats stay on the device (`device_sums`) until the log line reads them: a
    GPU never waits for the host in the middle of a step."""

    device_sums: torch.Tensor | None = None
    """float64 [1 + stats]: the summed loss, then the objective's stats in run.stat_names'
    order (preference rewards: training/preference.py)."""
    label_tokens: int = 0
    tokens: int = 0
    llm_flops: float = 0.0
    vision_flops: float = 0.0
    """Model FLOPs of the window's micro-batches (training/flops.py)."""
    data_seconds: float = 0.0
    """Time spent waiting for the loader's batches (reading, decoding, collating)."""
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss_sum: torch.Tensor, stats: dict, names: list[str]) -> None:
        values = [loss_sum.detach().double().reshape(())]
        values += [torch.as_tensor(stats.get(name, 0.0), dtype=torch.float64,
                                   device=loss_sum.device).detach().reshape(())
                   for name in names]
        sums = torch.stack(values)
        self.device_sums = sums if self.device_sums is None else self.device_sums + sums


def fit(run: Run, on_event: OnEvent) -> TrainResult:
    """Run the optimizer steps from `run.position` to `run.total_steps`, then save the final
    weights and the COMPLETE marker. Events go to `on_event` (main process only)."""
    acc = run.accelerator
    emit = on_event if acc.is_main_process else (lambda event: None)
    emit(run.started)
    if acc.is_main_process:
        run.plotter = LossPlotter(run.run_dir)
    run.model.train()
    skipped: list[tuple[str, str]] = []
    window, last_loss = _Window(), float("nan")
    pending_stop: torch.Tensor | None = None
    with _stop_requests() as stop:
        for step_batches, data_seconds in _optimizer_steps(run):
            window.data_seconds += data_seconds
            for batch in step_batches:
                for sample_id, reason in batch.skipped:
                    emit(SampleSkipped(sample_id, reason))
                skipped += batch.skipped
            # Several processes: the previous step's agreement to stop, read now (its
            # reduction finished long ago), so they stop together without a per-step wait.
            agreed = pending_stop is not None and pending_stop.item() > 0
            pending_stop = _step(run, step_batches, window, stop.requested)
            run.position.step += 1
            step = run.position.step
            if step % run.config.train.log_every == 0 or step == run.total_steps:
                last_loss = _log(run, window, emit)
                window = _Window()
            if run.eval_loader is not None and (step == run.total_steps or (
                    run.config.train.eval_every and step % run.config.train.eval_every == 0)):
                _evaluate(run, emit)
            if run.config.train.save_every and step % run.config.train.save_every == 0:
                _checkpoint(run, emit)
            # Several processes stop together, a step after all of them agree (the request
            # travels with the step's reduction); one process stops right here.
            if agreed or (acc.num_processes == 1 and stop.requested):
                return _interrupted(run, emit, skipped, last_loss)
    acc.wait_for_everyone()
    parts, warnings = [], []
    if acc.is_main_process:
        parts = save_weights(run.run_dir, acc.unwrap_model(run.model), run.bundle,
                             run.position.step)
        plot_error = run.plotter.finish()
        if plot_error:  # the weights are saved: a missing plot is worth a warning, not a failure
            warnings.append(f"{run.run_dir / rundir.LOSS_PLOT} not drawn: {plot_error}")
    rewards = reward_metrics(run.run_stats) if run.run_stats else None
    emit(Finished(run.position.step, last_loss, run.run_dir, len(skipped), parts, warnings,
                  rewards))
    return TrainResult(run.run_dir, run.position.step, last_loss, run.data, skipped)


def _optimizer_steps(run: Run) -> Iterator[tuple[list[Batch], float]]:
    """Micro-batches grouped per optimizer step (train.grad_accum of them; the last group of
    an epoch may be shorter), from the run's position until total_steps, each group with the
    seconds spent waiting for its batches."""
    if run.stream is not None:
        yield from _stream_steps(run)
        return
    k = run.config.train.grad_accum
    position = run.position
    while position.step < run.total_steps:
        run.loader.set_epoch(position.epoch)
        loader = run.loader
        if position.batch_in_epoch:
            loader = run.accelerator.skip_first_batches(run.loader, position.batch_in_epoch)
        group: list[Batch] = []
        waited = 0.0
        batches = iter(loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - start
            if batch is None:
                break
            group.append(batch)
            if len(group) == k:
                position.batch_in_epoch += len(group)
                yield group, waited
                group, waited = [], 0.0
                if position.step >= run.total_steps:
                    return
        if group:
            position.batch_in_epoch += len(group)
            yield group, waited
        position.epoch, position.batch_in_epoch = position.epoch + 1, 0


def _stream_steps(run: Run) -> Iterator[tuple[list[Batch], float]]:
    """_optimizer_steps on a stream: train.grad_accum batches a step, on this process's
    device (the loader is not accelerate's), each batch's stream position kept in run.stream
    as it is handed over, so a checkpoint after the step holds exactly what was trained on.
    The stream goes from epoch to epoch by itself (position.epoch follows it)."""
    k = run.config.train.grad_accum
    position = run.position
    batches = iter(run.loader)
    while position.step < run.total_steps:
        group: list[Batch] = []
        waited = 0.0
        while len(group) < k:
            start = time.perf_counter()
            batch = next(batches)  # never ends: a stream reads epoch after epoch
            waited += time.perf_counter() - start
            run.stream.advance(batch.position)
            group.append(batch.to(run.accelerator.device))
        position.batch_in_epoch += k
        position.epoch = run.stream.epoch
        yield group, waited


def _step(run: Run, batches: list[Batch], window: _Window,
          stop_requested: bool) -> torch.Tensor | None:
    """One optimizer step over `batches`. Several processes: returns the device flag of
    whether every process asks to stop (read by the caller a step later, so nothing here
    waits for the device); one process: None.

    The loss of the step is the sum of its token losses divided by the label tokens of the
    whole step, over the accumulation window and every process, so every token weighs the
    same whatever the batch size, accumulation or process count. accelerate divides by
    grad_accum in backward and DDP averages over processes; `scale` undoes both.
    """
    acc = run.accelerator
    units = sum(b.loss_units for b in batches)
    stop_flag = None
    if acc.num_processes == 1:  # the step's label tokens are known on the host
        scale: float | torch.Tensor = acc.gradient_accumulation_steps / max(units, 1.0)
    else:  # every process's count, summed on the device: no .item() before the backward
        counts = acc.reduce(torch.tensor([units, float(stop_requested)], device=acc.device,
                                         dtype=torch.float64), reduction="sum")
        scale = acc.num_processes * acc.gradient_accumulation_steps / counts[0].clamp(min=1.0)
        stop_flag = counts[1]
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        acc.sync_gradients = last
        with nullcontext() if last else acc.no_sync(run.model):
            loss_sum, stats = run.objective(run.model, batch)
            step_scale = scale.to(loss_sum.dtype) if isinstance(scale, torch.Tensor) else scale
            acc.backward(loss_sum * step_scale)
        window.add(loss_sum, stats, run.stat_names)
        window.label_tokens += batch.loss_units
        window.tokens += batch.num_tokens
        llm_flops, vision_flops = run.cost.of_batch(batch)
        window.llm_flops += llm_flops
        window.vision_flops += vision_flops
    if run.config.train.max_grad_norm:
        acc.clip_grad_norm_(run.params, run.config.train.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad()
    return stop_flag


def _log(run: Run, window: _Window, emit: OnEvent) -> float:
    """One metrics line: the token-weighted mean loss, tokens/s and model FLOPs of all
    processes."""
    acc = run.accelerator
    elapsed = time.perf_counter() - window.start
    names = run.stat_names
    host = torch.tensor([window.label_tokens, window.tokens, window.llm_flops,
                         window.vision_flops], device=acc.device, dtype=torch.float64)
    sums = (window.device_sums if window.device_sums is not None
            else torch.zeros(1 + len(names), device=acc.device, dtype=torch.float64))
    totals = acc.reduce(torch.cat([sums.to(acc.device), host]), reduction="sum")
    loss_sum, *stat_sums = totals[:1 + len(names)].tolist()  # the one sync of the window
    label_tokens, tokens, llm_flops, vision_flops = totals[1 + len(names):].tolist()
    rewards = None
    if names:
        stats = dict(zip(names, stat_sums, strict=True))
        for name, value in stats.items():
            run.run_stats[name] = run.run_stats.get(name, 0.0) + value
        rewards = reward_metrics(stats)
    loss = loss_sum / max(label_tokens, 1.0)
    # Per process: what one GPU achieved, on average, the figure its peak compares with.
    tflops = (llm_flops + vision_flops) / max(elapsed, 1e-9) / acc.num_processes / 1e12
    mfu = round(tflops / run.peak.tflops, 4) if run.peak is not None else None
    event = Logged(step=run.position.step, total_steps=run.total_steps, epoch=run.position.epoch,
                   loss=round(loss, 5), lr=run.scheduler.get_last_lr()[0],
                   tokens_per_s=round(tokens / max(elapsed, 1e-9), 1),
                   memory_mb=round(peak_memory_mb(), 1), tflops=round(tflops, 6), mfu=mfu,
                   rewards=rewards)
    record = {"step": event.step, "epoch": event.epoch, "loss": event.loss, "lr": event.lr,
              "tokens_per_s": event.tokens_per_s, "memory_mb": event.memory_mb,
              # the window's raw numbers, so that windows can be added up (benchmarks)
              "tokens": int(tokens), "seconds": round(elapsed, 6),
              # this process's wait for batches in the window (data loading, not compute)
              "data_seconds": round(window.data_seconds, 6),
              # model FLOPs per token of the window (the vision side's spread over all its
              # tokens), and model TFLOP/s per process
              "flops_per_token_llm": round(llm_flops / max(tokens, 1.0)),
              "flops_per_token_vision": round(vision_flops / max(tokens, 1.0)),
              "tflops": event.tflops}
    if mfu is not None:  # absent, not 0, where the peak is not known (the CPU, unknown GPUs)
        record["mfu"] = mfu
    if rewards is not None:
        record.update(rewards)
    reserved = peak_reserved_mb()
    if reserved is not None:  # CUDA: memory_mb is torch's peak allocated, this its peak reserved
        record["memory_reserved_mb"] = round(reserved, 1)
    run.metrics.write(record)
    emit(event)
    return loss


@torch.no_grad()
def _evaluate(run: Run, emit: OnEvent) -> None:
    """Validation loss: token-weighted mean over every sample of data.eval, all processes
    (pair-weighted for preference pairs, with their rewards)."""
    acc = run.accelerator
    names = run.stat_names
    run.model.eval()
    totals = torch.zeros(2 + len(names), device=acc.device, dtype=torch.float64)
    for batch in run.eval_loader:
        batch = batch.to(acc.device)
        loss_sum, stats = run.objective(run.model, batch)
        totals += torch.stack([loss_sum.detach().double(),
                               loss_sum.new_tensor(batch.loss_units, dtype=torch.float64),
                               *(stats[n].double() for n in names)])
    totals = acc.reduce(totals, reduction="sum")
    run.model.train()
    eval_loss = totals[0].item() / max(totals[1].item(), 1.0)
    rewards = reward_metrics(dict(zip(names, totals[2:].tolist(), strict=True))) if names else None
    record = {"step": run.position.step, "eval_loss": round(eval_loss, 5)}
    record.update({f"eval_{name}": value for name, value in (rewards or {}).items()})
    run.metrics.write(record)
    emit(Evaluated(run.position.step, round(eval_loss, 5), int(totals[1].item()), rewards))


def _checkpoint(run: Run, emit: OnEvent) -> Path | None:
    """A resumable checkpoint (main process), and the loss plot so far."""
    acc = run.accelerator
    path = None
    p = run.position
    state = {"step": p.step, "epoch": p.epoch, "batch_in_epoch": p.batch_in_epoch}
    if run.stream is not None:
        state["stream"] = _stream_state(run)
    if acc.is_main_process:
        path = save_checkpoint(run.run_dir, p.step, acc.unwrap_model(run.model), run.optimizer,
                               run.scheduler, state, run.config.train.save_total_limit)
        run.plotter.update()
        emit(CheckpointSaved(p.step, path))
    acc.wait_for_everyone()
    return path


def _stream_state(run: Run) -> dict:
    """Every process's stream position (gathered: each process knows its own only), with
    what a resumed run must match (StreamDataset.resume)."""
    acc = run.accelerator
    mine = torch.tensor(run.stream.as_list(), dtype=torch.int64, device=acc.device)
    rows = acc.gather(mine).view(acc.num_processes, -1).tolist()
    dataset = run.loader.dataset
    return {"key": dataset.key(), "processes": acc.num_processes, "readers": dataset.readers,
            "positions": rows}


def _interrupted(run: Run, emit: OnEvent, skipped, last_loss) -> TrainResult:
    """Ctrl-C reached a step boundary: checkpoint when the run writes them, say how to go on."""
    step = run.position.step
    checkpoint = None
    if run.config.train.save_every:
        checkpoint = run.run_dir / rundir.CHECKPOINTS / f"step-{step:07d}"
        # fit wrote this step's checkpoint when the step is a multiple of save_every. Known by
        # arithmetic, not by looking at the disk: on machines that do not see the run dir the
        # look would differ, and _checkpoint waits for every process.
        if step % run.config.train.save_every:
            checkpoint = _checkpoint(run, emit)
    processes = run.accelerator.num_processes
    resume = (rundir.resume_command(run.run_dir, relaunch_command(processes))
              if checkpoint is not None else None)
    if run.plotter is not None:
        run.plotter.wait()  # no child left drawing into the run dir after this process exits
    emit(Interrupted(step, checkpoint, resume, machines(processes)))
    return TrainResult(run.run_dir, step, last_loss, run.data, skipped, interrupted=True)


class _StopFlag:
    requested = False


@contextmanager
def _stop_requests() -> Iterator[_StopFlag]:
    """The first Ctrl-C asks the loop to stop at the next step boundary; a second one stops at
    once. (Only the main thread can handle signals; elsewhere Ctrl-C stops at once.)

    torchrun starts its workers in sessions of their own: a terminal's Ctrl-C reaches torchrun
    alone, which passes it on to every worker once."""
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
