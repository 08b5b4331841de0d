"""Everything a training run needs before its first step, in the order it is needed:
checks, accelerator, run dir and its lock, model, data, optimizer, resume state; the `Run`
that `loop.fit` then trains."""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader, Subset

from llava_tune import rundir
from llava_tune.assembly.model import ModelBundle, build_model, carry_over
from llava_tune.assembly.trainable import parameter_counts, set_trainable
from llava_tune.config import Config, DataSpec, absolute_paths, check_paths, train_is_stream
from llava_tune.constants import STAGES
from llava_tune.data.collate import Collator
from llava_tune.data.datasets import ConversationDataset, DataReport, PackedDataset
from llava_tune.data.sampler import LengthGroupedSampler
from llava_tune.data.sources import resolve_sources, source_problems
from llava_tune.data.stream import StreamDataset, StreamPosition, stream_shards
from llava_tune.errors import UserError
from llava_tune.launch import check_launch, machines, mixed_precision
from llava_tune.models.attention import use_segmented_attention
from llava_tune.models.llava import unwrap_causal_lm
from llava_tune.stages import has_vision, llm_mode, vision_mode
from llava_tune.training.checkpoint import latest_checkpoint, load_checkpoint
from llava_tune.training.events import Started
from llava_tune.training.flops import StepCost, step_cost
from llava_tune.training.machines import machine_index, per_disk, seen_by_all, share
from llava_tune.training.metrics import MetricsLog
from llava_tune.training.peaks import Peak, find_peak
from llava_tune.training.plot import LossPlotter
from llava_tune.training.preference import (
    STATS,
    DpoObjective,
    lm_objective,
    precompute_reference,
)


@dataclass
class Position:
    """Where a run is: optimizer steps done, epoch, micro-batches consumed in this epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


@dataclass(kw_only=True)
class Run:
    """Everything `loop.fit` needs, built by `setup`."""

    config: Config
    run_dir: Path
    accelerator: Accelerator
    bundle: ModelBundle
    model: torch.nn.Module
    """The prepared (maybe distributed) model."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader
    eval_loader: DataLoader | None
    params: list[torch.nn.Parameter]
    total_steps: int
    position: Position
    started: Started
    metrics: MetricsLog
    data: DataReport
    close: Callable[[], None]
    """Closes the metrics log and releases the run dir's lock."""
    cost: StepCost
    """Counts the model FLOPs of each micro-batch."""
    peak: Peak | None = None
    """One process's peak TFLOP/s, for MFU; None when not known."""
    plotter: LossPlotter | None = None
    """Draws RUN/loss.png (main process; set by `fit`)."""
    stream: StreamPosition | None = None
    """Training on a stream: where this process is in it (the loop advances it batch by
    batch and checkpoints it)."""
    objective: Callable = lm_objective
    """(model, batch) -> (summed loss, {stat: sum}): the token loss, or the preference loss
    (training/preference.py)."""
    stat_names: tuple[str, ...] = ()
    """The stats the objective adds up (preference.STATS for dpo)."""
    run_stats: dict[str, float] = field(default_factory=dict)
    """Those stats over the whole run, all processes (filled at each log line)."""



def setup(config: Config, overwrite: bool = False) -> Run:
    """Check the config's files and the launch, take the run dir, build the model and data,
    restore a checkpoint when resuming. Raises UserError before touching anything when the
    run cannot start."""
    if config.model.images is None and STAGES[config.stage].vision is None:
        # dpo: with or without images as its init_from run; recorded in the run's config, so
        # loading the run never looks at init_from again.
        config = dataclasses.replace(config, model=dataclasses.replace(
            config.model, images=has_vision(config)))
    needs_images = has_vision(config)
    problems = check_paths(config, needs_images) + source_problems(config.data, needs_images)
    if problems:
        raise UserError("cannot start training:\n  " + "\n  ".join(problems))
    if train_is_stream(config.data.train):
        stream_shards(config.data.train)  # a folder without shards stops here, not after loading
    config = with_init_from_base(absolute_paths(config))
    check_launch(config)
    accelerator = make_accelerator(config)
    run_dir = Path(config.run_dir)
    created = not run_dir.exists()
    lock = None
    try:
        lock = claim_run_dir(run_dir, config, overwrite, accelerator)
        return _build_run(config, accelerator, run_dir, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        if created and accelerator.is_main_process and run_dir.is_dir() \
                and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that never started leaves no empty folder behind
        raise


def with_init_from_base(config: Config) -> Config:
    """A run that starts from one that trained the full LLM trains on that LLM (its llm/)."""
    if config.init_from and (Path(config.init_from) / rundir.LLM).is_dir():
        model = dataclasses.replace(config.model, llm=str(Path(config.init_from) / rundir.LLM))
        return dataclasses.replace(config, model=model)
    return config


def make_accelerator(config: Config) -> Accelerator:
    # find_unused_parameters: with several processes, a batch of text-only samples leaves the
    # projector (and tower) without gradients on one process but not the others.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=has_vision(config))
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=config.train.grad_accum,
        mixed_precision=mixed_precision(config.train.mixed_precision),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                   non_blocking=torch.cuda.is_available()),
        kwargs_handlers=[ddp],
    )


def claim_run_dir(run_dir: Path, config: Config, overwrite: bool,
                  accelerator: Accelerator) -> rundir.RunLock:
    """Lock the run dir (main process) and refuse to destroy what is in it; every process
    learns the outcome, so a refusal stops them all."""
    lock = rundir.RunLock(run_dir)
    error = None
    if accelerator.is_main_process:
        try:
            lock.acquire()
            rundir.prepare_for_training(run_dir, config.train.resume, overwrite)
        except UserError as err:
            lock.release()
            error = err
    failed = accelerator.reduce(torch.tensor([float(error is not None)], device=accelerator.device),
                                reduction="sum")
    if error is not None:
        raise error
    if failed.item():
        raise UserError(f"the main process refused run dir {run_dir} (see its message)")
    return lock


def build_for_training(config: Config, device=None) -> tuple[ModelBundle, list[str]]:
    """The model of a run about to train: base LLM and tower, everything init_from trained,
    the stage's parts set trainable; returns it and the parts carried over."""
    bundle = build_model(config, Path(config.model.llm), config.model.quantization, device)
    carried = carry_over(bundle, Path(config.init_from)) if config.init_from else []
    set_trainable(bundle.model, config)
    if config.train.gradient_checkpointing:
        bundle.model.llm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        bundle.model.llm.config.use_cache = False
        if bundle.model.vision is not None and bundle.model.vision.trains:
            bundle.model.vision.base.set_grad_checkpointing(True)
    return bundle, carried


def build_dataset(config: Config, bundle: ModelBundle, spec: DataSpec,
                  key: str = "data.train") -> ConversationDataset | PackedDataset:
    """The dataset of `spec` (config.data.train or .eval, named `key` in errors: a file, a
    glob, a list or a mixture; data/sources.py), packed when data.pack is set."""
    sources = resolve_sources(spec, config.data.image_folder, key,
                              needs_images=bundle.model.layout is not None)
    dataset = ConversationDataset(
        sources, bundle.tokenizer, bundle.template, config.data.max_length,
        image_processor=bundle.image_processor, layout=bundle.model.layout,
        max_bad_fraction=config.data.max_bad_fraction, cache_dir=config.data.cache_dir,
        num_proc=config.data.num_proc, seed=config.train.seed,
        preference=config.stage == "dpo",
    )
    if config.data.pack:
        return PackedDataset(dataset, config.data.max_length, seed=config.train.seed)
    return dataset


def build_stream(config: Config, bundle: ModelBundle, accelerator: Accelerator) -> StreamDataset:
    """This process's share of data.train, a folder of shards read as a stream."""
    tc = config.train
    return StreamDataset(
        config.data.train, bundle.tokenizer, bundle.template, config.data.max_length,
        image_folder=config.data.image_folder, image_processor=bundle.image_processor,
        layout=bundle.model.layout, seed=tc.seed, shuffle_buffer=config.data.shuffle_buffer,
        pack=config.data.pack, rank=accelerator.process_index, world=accelerator.num_processes,
        readers=config.data.num_workers, wanted=stream_wanted(config, accelerator.num_processes))


def stream_wanted(config: Config, processes: int) -> int:
    """Samples (rows, packed) that train.max_steps takes from a stream, all processes."""
    tc = config.train
    return tc.max_steps * tc.batch_size * tc.grad_accum * processes


def stream_notes(config: Config, stream: StreamDataset, processes: int) -> list[str]:
    """What to know before the first step of a run on a stream: a stream too short for one
    pass of train.max_steps, files in the folder that are not read, no feature cache."""
    notes = []
    tc, report = config.train, stream.report
    wanted, per_step = stream_wanted(config, processes), tc.batch_size * tc.grad_accum * processes
    if report.complete and report.total < wanted:
        what = "packed rows (a row holds one record or more)" if config.data.pack else "samples"
        # Packed, a row holds one record or more: one pass takes that many steps or fewer.
        fewer = " or fewer" if config.data.pack else ""
        fix = (f"; train.max_steps={report.total // per_step}{fewer} is one pass"
               if report.total >= per_step else "")
        notes.append(
            f"warning: the stream holds {report.total:,} records, fewer than the {wanted:,} "
            f"{what} that train.max_steps={tc.max_steps} takes ({tc.batch_size} a batch x "
            f"{tc.grad_accum} accumulated x {processes} processes): it will be read again, "
            f"each epoch in a new order{fix}")
    ignored = sorted(p.name for p in stream.folder.glob("*.json"))
    if ignored:
        notes.append(f"not read: {len(ignored)} .json files in {stream.folder} (e.g. "
                     f"{ignored[0]}); a stream reads .jsonl, .parquet, .arrow and .tar shards")
    if config.data.feature_cache:
        notes.append("data.feature_cache is not used for the stream (its images are read as "
                     "the stream reaches them)")
    return notes


def make_loaders(config: Config, bundle: ModelBundle, accelerator: Accelerator, train_set,
                 eval_set):
    """The training loader (shuffled, grouped by length, or a stream's, which splits itself
    between processes and workers) and this process's share of the validation set (every
    sample exactly once over all processes)."""
    collate = Collator(bundle.tokenizer.pad_token_id, preference=config.stage == "dpo")
    tc = config.train
    # On a GPU, batches are pinned in the loader (its thread, or the workers' side) so their
    # copy to the device (accelerate's, non_blocking) overlaps the step before; workers
    # outlive an epoch instead of starting again (a stream's restart per epoch: it resumes
    # by position).
    cuda = accelerator.device.type == "cuda"
    options = {"batch_size": tc.batch_size, "collate_fn": collate,
               "num_workers": config.data.num_workers, "pin_memory": cuda}
    if isinstance(train_set, StreamDataset):
        loader = DataLoader(train_set, **options)
    else:
        options["persistent_workers"] = config.data.num_workers > 0
        if config.data.group_by_length:
            sampler = LengthGroupedSampler(train_set.lengths(), train_set.has_images(),
                                           tc.batch_size * accelerator.num_processes,
                                           seed=tc.seed)
            loader = DataLoader(train_set, sampler=sampler, **options)
        else:
            loader = DataLoader(train_set, shuffle=True, **options)
    eval_loader = None
    if eval_set is not None:
        share = Subset(eval_set, range(accelerator.process_index, len(eval_set),
                                       accelerator.num_processes))
        eval_loader = DataLoader(share, batch_size=tc.batch_size, collate_fn=collate)
    return loader, eval_loader


def _build_run(config: Config, accelerator: Accelerator, run_dir: Path,
               lock: rundir.RunLock) -> Run:
    tc = config.train
    set_seed(tc.seed)
    bundle, carried = build_for_training(config, device=accelerator.device)
    # Training batches are right-padded or packed: attention needs no mask (models/attention.py);
    # the model attends as before once the run closes (generation pads on the left).
    attention_before = use_segmented_attention(bundle.model.llm)
    if tc.compile:
        compile_layers(bundle.model.llm)
    streaming = train_is_stream(config.data.train)
    if streaming:
        train_set = build_stream(config, bundle, accelerator)
    else:
        train_set = build_dataset(config, bundle, config.data.train)
    eval_set = (build_dataset(config, bundle, config.data.eval, "data.eval")
                if config.data.eval else None)
    if streaming:
        notes = stream_notes(config, train_set, accelerator.num_processes)
        if eval_set is not None:
            notes += use_feature_cache(config, bundle, accelerator, [eval_set])
    else:
        notes = use_feature_cache(config, bundle, accelerator, [train_set, eval_set])
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"nothing trains in stage {config.stage} with train.llm={llm_mode(config)}")
    objective, stat_names = lm_objective, ()
    if config.stage == "dpo":
        objective, stat_names = DpoObjective(config.dpo, params), STATS
        notes += reference_model(config, bundle, accelerator, run_dir, objective,
                                 [train_set, eval_set])
    loader, eval_loader = make_loaders(config, bundle, accelerator, train_set, eval_set)
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    # The model is already on its device (4-bit weights must not move); the loader is prepared
    # so that an epoch counts this process's share of the batches. A stream's is not: it
    # splits itself, and accelerate's wrapper of an iterable loader would split it again (or
    # read it on the main process alone and send each process its part).
    if streaming:
        _deepspeed_micro_batch(accelerator, tc.batch_size)
        model, optimizer = accelerator.prepare(bundle.model, optimizer,
                                               device_placement=[False, True])
        total_steps = tc.max_steps
    else:
        model, optimizer, loader = accelerator.prepare(
            bundle.model, optimizer, loader, device_placement=[False, True, True])
        total_steps = steps_for(len(loader), config)
    # Stepped by the loop once per optimizer step (accelerate's wrapper would step it once per
    # process), so the schedule spans exactly total_steps on any number of processes.
    scheduler = cosine_with_warmup(optimizer, round(tc.warmup_ratio * total_steps), total_steps)
    position = Position()
    if tc.resume:
        checkpoint = agreed_checkpoint(run_dir, accelerator)
        state = load_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, scheduler)
        position = Position(state["step"], state["epoch"], state["batch_in_epoch"])
        if streaming and "stream" not in state:
            raise UserError(f"checkpoint {checkpoint} was written by a run on a data file, not "
                            f"on a stream: it cannot continue on {config.data.train}")
        if streaming:
            train_set.resume(state["stream"])
    if accelerator.is_main_process:
        rundir.save_config(run_dir, config)
    if not seen_by_all(run_dir, accelerator):
        notes.append(f"run dir {run_dir} is not on a filesystem every machine sees: the main "
                     "machine's copy alone gets the checkpoints and weights, and "
                     "train.resume=true needs its checkpoints/ on every machine (same path)")
    metrics = MetricsLog(run_dir / rundir.METRICS, position.step, accelerator.is_main_process)
    peak = find_peak(tc.peak_tflops, accelerator.device, computes_in_half(config, bundle))
    if peak is not None:
        notes.append(f"MFU against {peak.tflops:g} TFLOP/s per process ({peak.source})")
    elif accelerator.device.type == "cuda":
        notes.append(f"no MFU: the peak of {torch.cuda.get_device_name(accelerator.device)} in "
                     "this run's precision is not known; give it as train.peak_tflops")
    started = Started(
        run_dir=run_dir, stage=config.stage, llm=llm_mode(config), vision=vision_mode(config),
        parameters=parameter_counts(bundle.model), data=train_set.report,
        eval_data=eval_set.report if eval_set is not None else None, total_steps=total_steps,
        step=position.step, device=str(accelerator.device), processes=accelerator.num_processes,
        machines=machines(accelerator.num_processes),
        carried=carried, notes=notes)

    def close() -> None:
        bundle.model.llm.set_attn_implementation(attention_before)
        metrics.close()
        lock.release()

    stream = StreamPosition.from_list(train_set.start.as_list()) if streaming else None
    return Run(config=config, run_dir=run_dir, accelerator=accelerator, bundle=bundle, model=model,
               optimizer=optimizer, scheduler=scheduler, loader=loader, eval_loader=eval_loader,
               params=params, total_steps=total_steps, position=position, started=started,
               metrics=metrics, data=train_set.report, close=close,
               cost=step_cost(bundle.model, config), peak=peak, stream=stream,
               objective=objective, stat_names=stat_names)


def compile_layers(llm: torch.nn.Module) -> None:
    """train.compile: each decoder layer compiled in place (`Module.compile`: its weights keep
    their names, so checkpoints and exports do not change), for any sequence length; under
    gradient checkpointing, the checkpointed forward as one region recomputed in backward."""
    # A checkpointed forward may not change state outside it, as eager checkpointing would
    # replay that change when it recomputes the layer; dynamo then leaves the whole layer
    # eager. The one change in transformers' layers is the hub kernels' routing (kernels'
    # use_kernelized_func: set at the attention's start, reset at its end), which a
    # recompute of the traced graph needs no replay of. (An older torch has no such switch:
    # its checkpointed layers stay eager.)
    import torch._dynamo

    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in unwrap_causal_lm(llm).get_decoder().layers:
        layer.compile(dynamic=True)


def reference_model(config: Config, bundle: ModelBundle, accelerator: Accelerator,
                    run_dir: Path, objective: DpoObjective, datasets: list) -> list[str]:
    """Stage dpo's reference, the starting weights (before any checkpoint loads): their
    log-probabilities of every pair, precomputed (or read back), or the trained parameters'
    starting values kept for a live reference. Returns notes for the run's start."""
    notes = []
    if not config.init_from:
        notes.append("warning: stage dpo without init_from: the reference (and the starting "
                     "point) is the base model; to align a finetuned run, set "
                     "init_from=<its run dir>")
    if config.dpo.reference == "live":
        objective.start = [p.detach().clone() for p in objective.params]
        return [*notes, "reference: live (the starting weights of the trained parameters, "
                "set back for a forward at every step)"]
    folder = Path(config.data.cache_dir) if config.data.cache_dir else run_dir / rundir.REFERENCE
    for dataset in datasets:
        if dataset is None:
            continue
        computed = precompute_reference(config, dataset, bundle.model, folder, accelerator,
                                        bundle.tokenizer.pad_token_id)
        rows = len(dataset.table)
        notes.append(f"reference log-probabilities of {rows} pairs "
                     f"{'computed now' if computed else 'read back'} ({folder})")
    return notes


def computes_in_half(config: Config, bundle: ModelBundle) -> bool:
    """Whether the matrix products run in bf16 or fp16: mixed precision, or the LLM's own
    dtype (bf16 on GPUs by default; a 4-bit LLM keeps its other weights in its compute
    dtype)."""
    if mixed_precision(config.train.mixed_precision) in ("bf16", "fp16"):
        return True
    dtype = next((p.dtype for p in bundle.model.llm.parameters() if p.is_floating_point()),
                 torch.float32)
    return dtype in (torch.bfloat16, torch.float16)


def agreed_checkpoint(run_dir: Path, accelerator: Accelerator) -> Path:
    """The newest checkpoint in the run dir, the same for every process: processes on machines
    that do not share the run dir's filesystem would resume from different states, or find
    none (the main machine alone writes checkpoints)."""
    latest = latest_checkpoint(run_dir)
    step = int(latest.name.split("-")[1]) if latest is not None else -1
    steps = accelerator.gather(torch.tensor([step], device=accelerator.device)).tolist()
    if min(steps) != max(steps):
        seen = ", ".join(f"step {s}" if s >= 0 else "none" for s in steps)
        raise UserError(
            f"the processes see different newest checkpoints in {run_dir / rundir.CHECKPOINTS} "
            f"(by process: {seen}): a run on several machines resumes from a run dir that "
            "every machine sees (a shared filesystem), or from the main machine's "
            "checkpoints/ copied to the same path on every machine")
    assert latest is not None  # prepare_for_training refused a resume without checkpoints
    return latest


def _deepspeed_micro_batch(accelerator: Accelerator, batch_size: int) -> None:
    """DeepSpeed's micro-batch size, left "auto" by accelerate's configs, is read from the
    prepared loader, which a stream does not have: it is train.batch_size. (Untested: no
    DeepSpeed run on GPUs in this project yet.)"""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size


def steps_for(loader_batches: int, config: Config) -> int:
    """Optimizer steps of a run: train.max_steps, or epochs x ceil(batches / grad_accum)."""
    per_epoch = max(1, math.ceil(loader_batches / config.train.grad_accum))
    return config.train.max_steps or max(1, math.ceil(config.train.epochs * per_epoch))


def use_feature_cache(config: Config, bundle: ModelBundle, accelerator: Accelerator,
                      datasets: list) -> list[str]:
    """With data.feature_cache and a frozen tower, the datasets read the tower's features from
    the cache (filled first, each process computing its share) instead of decoding images."""
    tower = bundle.model.vision
    if not config.data.feature_cache or tower is None:
        return []
    if tower.trains:
        return [f"data.feature_cache is not used: the vision tower trains "
                f"(train.vision={vision_mode(config)})"]
    from llava_tune import progress
    from llava_tune.data.features import FeatureCache, tower_key

    inner = [d.dataset if isinstance(d, PackedDataset) else d for d in datasets if d is not None]
    cache = FeatureCache(config.data.feature_cache, tower_key(tower, bundle.image_processor),
                         (tower.num_patches, tower.hidden_size))
    items: dict = {}
    for dataset in inner:
        items.update(dataset.image_paths())
    # Each process computes its own share (the same order in every process, so the shares
    # are disjoint and cover every image), after all of them agree that the disk holds it.
    # Machines that do not share the cache folder each fill their own copy, split over their
    # own processes: a machine's processes read any image's features, not just their share's.
    shared = seen_by_all(cache.folder, accelerator)
    todo = cache.missing(share(list(items), accelerator, shared))
    need = sum(cache.bytes_for(items[item]) for item in todo)
    disk = 0 if shared else machine_index(accelerator)
    needs = per_disk(need, accelerator, shared)
    disk_need = needs[disk]
    disk_images = int(per_disk(len(todo), accelerator, shared)[disk])
    free = shutil.disk_usage(_existing(cache.folder)).free
    short = accelerator.reduce(torch.tensor([float(disk_need > free)], device=accelerator.device),
                               reduction="sum")
    if short.item() > 0:
        where = (f"would take {_gb(disk_need)} more for {disk_images} images (on this "
                 f"machine's disk, which has {_gb(free)} free)" if disk_need > free else
                 "does not fit on another machine's disk (see its message)")
        raise UserError(
            f"the feature cache {cache.folder} {where}: set data.feature_cache=null (the "
            "frozen tower then runs every step), point data.feature_cache at a disk with the "
            "room, or train on a subset of the data")
    bar = progress.Bar(len(todo), desc="caching image features", unit="image") \
        if accelerator.is_main_process else None
    computed = cache.fill(todo, tower, inner[0].tower_inputs,
                          on_progress=bar.reached if bar else lambda done, total: None)
    if bar:
        bar.close()
    accelerator.wait_for_everyone()
    computed = int(accelerator.reduce(torch.tensor(float(computed), device=accelerator.device),
                                      reduction="sum").item())
    for dataset in inner:
        dataset.feature_cache = cache
    size = f", {_gb(sum(needs))}" if computed else ""
    return [f"image features from {cache.folder} ({computed} computed now{size})"]


def _existing(path: Path) -> Path:
    """`path` or its nearest existing parent (for the free space of the disk it goes on)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def _gb(size: float) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def cosine_with_warmup(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup` steps, then cosine decay to zero at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        fraction = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, fraction)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
