"""The one training loop, on accelerate, for every stage."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader

from llava_tune.config import Config, absolute_paths, check_paths
from llava_tune.data.collate import Collator
from llava_tune.data.datasets import ConversationDataset, DataReport, PackedDataset
from llava_tune.engine.build import Built, build_for_training, llm_mode
from llava_tune.engine.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_config,
    save_weights,
    write_text_atomic,
)
from llava_tune.engine.stages import STAGES, parameter_counts
from llava_tune.errors import UserError

Event = dict
"""What the loop reports: {"event": "start" | "log" | "skip" | "end", ...}."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    data: DataReport
    skipped_at_runtime: list[tuple[str, str]] = field(default_factory=list)


def cosine_with_warmup(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup` steps, then cosine decay to zero at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def drop_metrics_after(file: Path, step: int) -> None:
    """On resume: forget the lines a crashed run logged after its last checkpoint, so the
    steps it repeats are not logged twice."""
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


def build_dataset(config: Config, built: Built) -> ConversationDataset | PackedDataset:
    vision = built.model.vision
    dataset = ConversationDataset(
        config.data.train, built.tokenizer, built.template, config.data.max_length,
        image_folder=config.data.image_folder, image_processor=built.image_processor,
        num_image_tokens=vision.num_patches if vision is not None else 0,
        max_bad_fraction=config.data.max_bad_fraction, cache_dir=config.data.cache_dir,
    )
    if config.data.pack:
        return PackedDataset(dataset, config.data.max_length, seed=config.train.seed)
    return dataset


def train(config: Config, on_event: Callable[[Event], None] = lambda event: None) -> TrainResult:
    """Train one stage as `config` says and write its run dir. Events go to `on_event`
    (the CLI draws them); nothing here prints."""
    problems = check_paths(config, needs_images=STAGES[config.stage].vision)
    if problems:
        raise UserError("cannot start training:\n  " + "\n  ".join(problems))
    config = absolute_paths(config)
    run_dir = Path(config.run_dir)
    tc = config.train
    accelerator = Accelerator(
        gradient_accumulation_steps=tc.grad_accum,
        mixed_precision=mixed_precision(tc.mixed_precision),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(tc.seed)
    built = build_for_training(config, device=accelerator.device)
    model = built.model
    dataset = build_dataset(config, built)
    if tc.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.llm.config.use_cache = False

    loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True,
                        collate_fn=Collator(built.tokenizer.pad_token_id),
                        num_workers=config.data.num_workers)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"nothing trains in stage {config.stage} with train.llm={llm_mode(config)}")
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    # The model is already on its device (4-bit weights must not move); the loader is
    # prepared first so that an epoch counts this process's share of the batches.
    model, optimizer, loader = accelerator.prepare(
        model, optimizer, loader, device_placement=[False, True, True])
    steps_per_epoch = max(1, len(loader) // tc.grad_accum)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    # Stepped by us once per optimizer step (accelerate's wrapper would step it once per
    # process), so the schedule spans exactly total_steps on any number of GPUs.
    scheduler = cosine_with_warmup(optimizer, round(tc.warmup_ratio * total_steps), total_steps)

    step, epoch, batch_in_epoch = 0, 0, 0
    if tc.resume and (checkpoint := latest_checkpoint(run_dir)):
        state = load_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, scheduler)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]

    main_process = accelerator.is_main_process
    if not main_process:  # one progress bar and one metrics.jsonl, however many GPUs
        on_event = lambda event: None  # noqa: E731
    if main_process:
        save_config(run_dir, config)
    unwrapped = accelerator.unwrap_model(model)
    on_event({"event": "start", "run_dir": str(run_dir), "stage": config.stage,
              "llm": llm_mode(config), "parameters": parameter_counts(unwrapped),
              "data": dataset.report, "total_steps": total_steps, "step": step,
              "device": str(accelerator.device)})

    if step and main_process:
        drop_metrics_after(run_dir / "metrics.jsonl", step)
    metrics_file = open(run_dir / "metrics.jsonl" if main_process else os.devnull,
                        "a" if step else "w", encoding="utf-8")
    skipped: list[tuple[str, str]] = []
    model.train()
    loss_sum, loss_count, tokens, window_start = 0.0, 0, 0, time.perf_counter()
    last_loss = float("nan")
    try:
        while step < total_steps:
            loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, batch_in_epoch) if batch_in_epoch else loader
            for batch in batches:
                batch_in_epoch += 1
                skipped += batch.pop("skipped")
                if "input_ids" not in batch:
                    continue
                tokens += batch.pop("num_tokens")
                with accelerator.accumulate(model):
                    loss = model(**batch, use_cache=False).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and tc.max_grad_norm:
                        accelerator.clip_grad_norm_(params, tc.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad()
                loss_sum += loss.item()
                loss_count += 1
                if not accelerator.sync_gradients:
                    continue
                step += 1
                if step % tc.log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    # Mean loss and summed tokens over all processes.
                    window = accelerator.reduce(torch.tensor(
                        [loss_sum / max(loss_count, 1), float(tokens)], device=accelerator.device),
                        reduction="sum")
                    last_loss = window[0].item() / accelerator.num_processes
                    record = {"step": step, "epoch": epoch, "loss": round(last_loss, 5),
                              "lr": scheduler.get_last_lr()[0],
                              "tokens_per_s": round(window[1].item() / elapsed, 1),
                              "memory_mb": round(peak_memory_mb(), 1)}
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    on_event({"event": "log", **record, "total_steps": total_steps})
                    loss_sum, loss_count, tokens, window_start = 0.0, 0, 0, time.perf_counter()
                if tc.save_every and step % tc.save_every == 0 and accelerator.is_main_process:
                    save_checkpoint(run_dir, step, accelerator.unwrap_model(model), optimizer,
                                    scheduler, {"step": step, "epoch": epoch,
                                                "batch_in_epoch": batch_in_epoch},
                                    tc.save_total_limit)
                if step >= total_steps:
                    break
            else:
                epoch, batch_in_epoch = epoch + 1, 0
    finally:
        metrics_file.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_weights(run_dir, accelerator.unwrap_model(model), built.tokenizer, llm_mode(config))
    on_event({"event": "end", "steps": step, "loss": last_loss, "skipped": skipped,
              "run_dir": str(run_dir)})
    return TrainResult(run_dir, step, last_loss, dataset.report, skipped)
