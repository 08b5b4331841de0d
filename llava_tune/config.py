"""Typed run configuration: YAML file + `key=value` overrides, every problem reported at once."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llava_tune.constants import (
    DPO_LOSSES,
    DPO_REFERENCES,
    IMAGE_ASPECTS,
    MIXED_PRECISIONS,
    QUANTIZATIONS,
    STAGES,
    TRAIN_MODES,
)
from llava_tune.errors import UserError


@dataclass
class VisionConfig:
    name: str = "ViT-L-14-336-quickgelu"
    """open_clip model name (OpenAI CLIP weights need the -quickgelu variant)."""
    pretrained: str | None = None
    """Local open_clip weights file, or a Hugging Face CLIP folder (e.g.
    openai/clip-vit-large-patch14-336 as downloaded); None initializes randomly (tests, demo)."""
    config_file: str | None = None
    """open_clip model config JSON to register first (model name = the file's stem)."""
    feature_layer: int = -2


@dataclass
class AnyresConfig:
    """LLaVA-NeXT's any-resolution tiles (model.image_aspect=anyres; models/anyres.py)."""

    grid_pinpoints: list[list[int]] = field(
        default_factory=lambda: [[1, 2], [2, 1], [2, 2], [1, 3], [3, 1]])
    """The grids an image may be cut into, [rows, cols] in tiles of the tower's input size
    (LLaVA-NeXT's 336-px pinpoints [[336, 672], ...] are [[1, 2], ...] at 336 px)."""
    max_tiles: int | None = None
    """Leave out the grids of more tiles than this (None: every grid)."""
    pool_max: int | None = None
    """OneVision's anyres_max_N: the tiles' features are pooled (bilinear) down to about N
    tiles' worth when they hold more than 1.1 N (None: never)."""
    multi_image: str = "tiles"
    """A sample with several images: tiles for each (LLaVA-NeXT), or "square": each one
    padded square plus a newline (LLaVA-OneVision; far fewer tokens)."""


@dataclass
class ModelConfig:
    llm: str = ""
    """Local checkpoint folder of the base LLM (InternLM2 or a native transformers LM)."""
    quantization: str | None = None
    """None, "4bit" (NF4, QLoRA) or "8bit"."""
    dtype: str = "auto"
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector_depth: int = 2
    image_aspect: str = "pad"
    """pad: each image padded to one square (LLaVA-1.5); anyres: an overview plus tiles of
    the image at its own aspect ratio (LLaVA-NeXT), see model.anyres."""
    anyres: AnyresConfig = field(default_factory=AnyresConfig)
    video_pool: int = 2
    """A video frame's feature map is pooled (bilinear) by this factor per side: 2 keeps a
    quarter of its tokens (LLaVA-OneVision)."""
    images: bool | None = None
    """Whether the model has the vision tower and the projector; None: as the stage says (dpo:
    as its init_from run; a run records what it resolved)."""
    template: str = "internlm2_chat"
    system: str | None = None
    """System prompt put before every conversation that has none."""


@dataclass
class LoraConfig:
    """A LoRA on the LLM (train.lora) or on the vision tower (train.vision_lora); the defaults
    are XTuner's recipe for the tower."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    """"all-linear": every linear layer of the LLM except the LM head; on the tower, every
    Linear of its attention and MLP (q_proj, k_proj, v_proj, out_proj, c_fc, c_proj;
    transformers' CLIP names fc1 and fc2 are accepted for the MLP)."""


SAMPLES_FORMS = "all, first:N or random:N (N a count, or a percentage such as 10%)"


@dataclass
class SourceConfig:
    """One source of a data mixture: an item of data.train (or data.eval) given as a mapping.
    How the sources combine is data/sources.py's (README: "Several files and mixtures")."""

    path: str = ""
    """A JSON/JSONL file, or a glob of them (sorted matches, one source together)."""
    image_folder: str | None = None
    """The folder this source's image paths are relative to; None: data.image_folder."""
    weight: float | None = None
    """This source's share of the weighted sources' samples, relative to their weights."""
    samples: str | None = None
    """all (the default), first:N or random:N; N a count or a percentage (random:10%)."""


def parse_samples(value: str) -> tuple[str, int | None, float | None]:
    """A source's `samples` as (rule, count, percent): ("all", None, None),
    ("first", 1000, None), ("random", None, 10.0). ValueError, saying what is wrong, for
    anything else."""
    text = value.strip()
    if text == "all":
        return "all", None, None
    rule, colon, amount = text.partition(":")
    if not colon or rule not in ("first", "random"):
        raise ValueError(f"use {SAMPLES_FORMS}")
    amount = amount.strip()
    percent = amount.endswith("%")
    try:
        number = float(amount[:-1]) if percent else int(amount)
    except ValueError:
        raise ValueError(f"{amount!r} is not a count or a percentage; use {SAMPLES_FORMS}") \
            from None
    if percent:
        if not 0 < number <= 100:
            raise ValueError(f"the percentage {amount} must be above 0% and at most 100%")
        return rule, None, number
    if number < 1:
        raise ValueError(f"the count {number} must be at least 1")
    return rule, number, None


DataSpec = str | list[str | SourceConfig]
"""What data.train and data.eval take: a file or a glob, a list of them, or a mixture (a
list whose items are files, globs or SourceConfig mappings)."""


@dataclass
class DataConfig:
    train: DataSpec = ""
    """LLaVA-format JSON or JSONL: a file, a glob, a list of files and globs, or a mixture
    of {path, image_folder, weight | samples} (data/sources.py); or a folder of shards, given
    alone, read as a stream (train_is_stream; data/stream.py)."""
    image_folder: str | None = None
    max_length: int = 2048
    max_bad_fraction: float = 0.01
    """Bad records up to this fraction are skipped and counted; more is an error."""
    num_workers: int = 0
    num_proc: int | None = None
    """Processes that check and tokenize the records when a data file is prepared (once:
    data/prepare.py); None: one per 20,000 records, up to the cores."""
    cache_dir: str | None = None
    """Where prepared (checked, tokenized) data files are kept, shared by the processes of a
    launch and reused by the next run; None: prepared again at every start."""
    pack: bool = False
    """Pack several short samples into each max_length row (no attention across them)."""
    group_by_length: bool = False
    """Batch samples of similar length (image and text-only samples apart), as LLaVA's
    group_by_modality_length does: less padding without packing."""
    eval: DataSpec | None = None
    """Held-out data (same formats and forms as `train`) for the validation loss."""
    video_frames: int = 8
    """Frames sampled uniformly from each video (`video` in a record: a file or a folder
    of frames); chat and eval use the run's value."""
    feature_cache: str | None = None
    """Folder for the frozen vision tower's features, computed once per image and reused
    across epochs and stages (data/features.py; off while the tower trains). ~1.2 MB per image
    for CLIP ViT-L/14-336."""
    shuffle_buffer: int = 1000
    """A stream's shuffle buffer (data.train a folder of shards): records are drawn at random
    from this many read ahead (after the shards' order is shuffled)."""


@dataclass
class TrainConfig:
    llm: str | None = None
    """frozen, lora or full; None takes the stage's default."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    vision: str | None = None
    """The vision tower: frozen, lora or full; None takes the stage's default (frozen)."""
    vision_lora: LoraConfig = field(default_factory=LoraConfig)
    epochs: float = 1.0
    max_steps: int | None = None
    """Optimizer steps; overrides epochs when set."""
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    """auto (bf16 on GPUs that have it), no, bf16 or fp16."""
    seed: int = 0
    log_every: int = 10
    save_every: int | None = None
    """Steps between resumable checkpoints; None: only the final weights."""
    eval_every: int | None = None
    """Steps between validation-loss evaluations on data.eval (always at the end too)."""
    save_total_limit: int = 2
    resume: bool = False
    """Continue from the newest checkpoint in run_dir/checkpoints."""
    compile: bool = False
    """torch.compile each of the LLM's decoder layers, checkpointed ones included (a packed
    row's per-sample attention stays eager: it would recompile for every batch); the first
    steps pay the compilation. Not with gradient_checkpointing and data.pack together (a
    checkpointed layer compiles whole or not at all)."""
    peak_tflops: float | None = None
    """The peak dense TFLOP/s of one GPU (or whatever a process runs on), for the MFU that
    metrics.jsonl and the progress bar report; None: from the table of known GPUs
    (training/peaks.py), or no MFU."""


@dataclass
class DpoConfig:
    """Preference training (stage dpo): the loss on each pair's chosen and rejected answers."""

    loss: str = "sigmoid"
    """sigmoid (DPO) or ipo."""
    beta: float = 0.1
    """How far from the reference the model may move: the rewards are beta x log-ratios."""
    label_smoothing: float = 0.0
    """sigmoid only: the share of pairs assumed to be labelled the wrong way round (cDPO)."""
    sft_weight: float = 0.0
    """Weight of an SFT term on the chosen answer (its mean token NLL), as RPO and MPO add."""
    reference: str = "precompute"
    """precompute: the reference's log-probabilities in one pass before training (cached);
    live: at every step, with the trained weights set back to where they started."""


@dataclass
class Config:
    stage: str = "finetune"
    run_dir: str = ""
    init_from: str | None = None
    """An earlier run dir this run starts from: everything it trained (projector, adapters,
    full weights) carries over, or the run refuses to start."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. ["stage", ..., "train.lora.r", ...]."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += valid_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _check_type(value: object, hint: object) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_check_type(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _accepts_str(hint: object) -> bool:
    return hint is str or str in typing.get_args(hint)


def _type_name(hint: object) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace(f"{__name__}.", "")


def _list_items(hint: object) -> tuple[object, type] | None:
    """(item hint, dataclass) when `hint` accepts a list whose items may be mappings of a
    dataclass's keys (data.train's `list[str | SourceConfig]`); else None."""
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is list:
            (item,) = typing.get_args(arg)
            classes = [a for a in (item, *typing.get_args(item)) if dataclasses.is_dataclass(a)]
            if classes:
                return item, classes[0]
    return None


def _build_list(value: list, item: object, cls: type, name: str, errors: list[str]) -> list:
    """The items of a list field: mappings built as `cls` (their own problems named
    `name[i].key`), the others checked against `item`."""
    built = []
    for index, entry in enumerate(value):
        if isinstance(entry, dict):
            built.append(_build(cls, entry, f"{name}[{index}].", errors))
        elif isinstance(entry, cls) or _check_type(entry, item):
            built.append(entry)
        else:
            errors.append(f"{name}[{index}]={entry!r} is not of type {_type_name(item)}")
    return built


def _build(cls: type, data: dict, prefix: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            errors.append(f"unknown key {prefix}{key}{hint}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                errors.append(f"{prefix}{f.name} must be a mapping of its own keys")
                continue
            values[f.name] = _build(hint, value, f"{prefix}{f.name}.", errors)
        elif isinstance(value, list) and (items := _list_items(hint)) is not None:
            values[f.name] = _build_list(value, *items, f"{prefix}{f.name}", errors)
        elif _check_type(value, hint):
            values[f.name] = float(value) if hint is float else value
        elif _accepts_str(hint) and isinstance(value, (int, float)) and not isinstance(value, bool):
            values[f.name] = str(value)  # run_dir=2024 names a folder, not a number
        else:
            errors.append(f"{prefix}{f.name}={value!r} is not of type {_type_name(hint)}")
    return cls(**values)


def _set_dotted(data: dict, key: str, value: object) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {key}: {part} is not a section")
    node[last] = value


def override_key_problem(item: str, key: str) -> str | None:
    """Why the key of override `item` ("train.lrr=1") is not a config key, naming the
    override, the unknown part and the keys valid in its section; None for a valid key (a
    leaf such as train.lr, or a section such as train.lora given a mapping)."""
    leaves = valid_keys(Config)
    if key in leaves or any(leaf.startswith(f"{key}.") for leaf in leaves):
        return None
    parts = key.split(".")
    depth = 0  # how many leading parts name an existing section
    while depth < len(parts) - 1 and any(
            leaf.startswith(".".join(parts[:depth + 1]) + ".") for leaf in leaves):
        depth += 1
    section = ".".join(parts[:depth])
    inside = [leaf for leaf in leaves if leaf.startswith(f"{section}.")] if section else leaves
    close = difflib.get_close_matches(key, inside, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    where = f" in {section}" if section else ""
    return (f"override {item!r}: unknown key {parts[depth]!r}{where}{hint}; valid: "
            + ", ".join(inside))


def parse_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    """`key=value` strings -> (key, YAML-typed value); `lr=1e-4` gives a float."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), _scalar(raw)))
    return parsed


def _scalar(raw: str) -> object:
    """YAML's reading of a value, except that `1e-3` is a number (YAML 1.1 wants `1.0e-3`)."""
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def yaml_problem(err: yaml.YAMLError) -> str:
    """Where and what a YAML error is, on one line (PyYAML's own message takes five)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply overrides, check every value; all problems in one UserError."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text; save the config as UTF-8") from None
        except yaml.YAMLError as err:
            raise UserError(f"{path} is not valid YAML ({yaml_problem(err)}); fix it there") \
                from err
        if not isinstance(data, dict):
            raise UserError(f"{path} must hold a mapping of config keys")
    # An override's typo is the command line's, not the file's: named as the user typed it
    # and left out of the config, so the file is not blamed for it.
    override_errors: list[str] = []
    for item, (key, value) in zip(overrides, parse_overrides(list(overrides)), strict=True):
        problem = override_key_problem(item, key)
        if problem is not None:
            override_errors.append(problem)
        else:
            _set_dotted(data, key, value)
    errors: list[str] = []
    config = _build(Config, data, "", errors)
    errors += validate(config)
    if errors or override_errors:
        if errors:
            where = f" in {path}" if path is not None else ""
        else:
            where = " in the key=value overrides"
        message = f"config problems{where}:\n  " + "\n  ".join(override_errors + errors)
        if any(e.startswith("unknown key") for e in errors):
            message += "\nvalid keys: " + ", ".join(valid_keys(Config))
        raise UserError(message)
    return config


def validate(config: Config) -> list[str]:
    """Problems with values (not files): stage, modes and their combinations."""
    errors = []
    if config.stage not in STAGES:
        errors.append(f"stage={config.stage!r}; use one of {_one_of(STAGES)}")
    if config.train.llm is not None and config.train.llm not in TRAIN_MODES:
        errors.append(f"train.llm={config.train.llm!r}; use one of {_one_of(TRAIN_MODES)}")
    if config.model.quantization not in QUANTIZATIONS:
        errors.append(f"model.quantization={config.model.quantization!r}; use one of "
                      f"{_one_of(QUANTIZATIONS)}")
    if config.model.quantization and config.train.llm == "full":
        errors.append("train.llm=full cannot train a quantized LLM; set model.quantization=null "
                      "or train.llm=lora")
    if config.train.mixed_precision not in MIXED_PRECISIONS:
        errors.append(f"train.mixed_precision={config.train.mixed_precision!r}; use one of "
                      f"{_one_of(MIXED_PRECISIONS)}")
    if config.train.vision is not None and config.train.vision not in TRAIN_MODES:
        errors.append(f"train.vision={config.train.vision!r}; use one of {_one_of(TRAIN_MODES)}")
    if config.stage == "sft" and config.train.vision not in (None, "frozen"):
        errors.append(f"train.vision={config.train.vision} in stage sft, which has no vision "
                      "tower; remove train.vision")
    if config.stage in STAGES and STAGES[config.stage].vision is not None \
            and config.model.images not in (None, STAGES[config.stage].vision):
        errors.append(f"model.images={config.model.images} in stage {config.stage}, which "
                      f"{'has' if STAGES[config.stage].vision else 'has no'} vision tower; "
                      "remove model.images (it chooses for stage dpo only)")
    errors += _dpo_problems(config)
    if not config.model.llm:
        errors.append("model.llm is not set: give the base LLM's local folder")
    if not config.data.train:
        errors.append("data.train is not set: give a JSON/JSONL data file (or a folder of shards)")
    errors += data_spec_problems("data.train", config.data.train)
    if config.data.eval is not None:
        if not config.data.eval:
            errors.append("data.eval is empty: give a JSON/JSONL data file (or null)")
        errors += data_spec_problems("data.eval", config.data.eval)
    if not config.run_dir:
        errors.append("run_dir is not set: give the output folder")
    if config.model.projector_depth < 1:
        errors.append("model.projector_depth must be at least 1")
    errors += _anyres_problems(config.model)
    tc = config.train
    for name in ("batch_size", "grad_accum", "log_every", "save_total_limit"):
        if getattr(tc, name) < 1:
            errors.append(f"train.{name}={getattr(tc, name)} must be at least 1")
    for name in ("max_steps", "save_every", "eval_every"):
        if getattr(tc, name) is not None and getattr(tc, name) < 1:
            errors.append(f"train.{name}={getattr(tc, name)} must be at least 1 (or null)")
    if tc.epochs <= 0:
        errors.append(f"train.epochs={tc.epochs} must be above 0 (or set train.max_steps)")
    if tc.lr <= 0:
        errors.append(f"train.lr={tc.lr} must be above 0 (e.g. 2e-4)")
    if not 0 <= tc.warmup_ratio < 1:
        errors.append(f"train.warmup_ratio={tc.warmup_ratio} must be in [0, 1)")
    if tc.weight_decay < 0:
        errors.append(f"train.weight_decay={tc.weight_decay} must be 0 or more")
    if tc.compile and tc.gradient_checkpointing and config.data.pack:
        # A checkpointed layer is one region for dynamo: the packed rows' eager attention
        # inside it leaves the whole layer eager (measured, torch 2.14), so the run would pay
        # for compilation and train as without it.
        errors.append("train.compile=true compiles nothing with train.gradient_checkpointing"
                      "=true and data.pack=true (packed rows attend sample by sample, eagerly, "
                      "and a checkpointed layer compiles whole or not at all): turn one of the "
                      "three off (data.group_by_length=true batches without packing)")
    if tc.peak_tflops is not None and tc.peak_tflops <= 0:
        errors.append(f"train.peak_tflops={tc.peak_tflops} must be above 0 (one GPU's peak "
                      "dense TFLOP/s, e.g. 989 for an H100 SXM in bf16), or null")
    if tc.max_grad_norm < 0:
        errors.append(f"train.max_grad_norm={tc.max_grad_norm} must be 0 (off) or more")
    for prefix, lora in (("train.lora", tc.lora), ("train.vision_lora", tc.vision_lora)):
        if lora.r < 1:
            errors.append(f"{prefix}.r={lora.r} must be at least 1 (e.g. 64)")
        if lora.alpha <= 0:
            errors.append(f"{prefix}.alpha={lora.alpha} must be above 0 (e.g. 16)")
        if not 0 <= lora.dropout < 1:
            errors.append(f"{prefix}.dropout={lora.dropout} must be in [0, 1)")
    if config.data.max_length < 8:
        errors.append(f"data.max_length={config.data.max_length} must be at least 8")
    if not 0 <= config.data.max_bad_fraction <= 1:
        errors.append(f"data.max_bad_fraction={config.data.max_bad_fraction} must be in [0, 1]")
    if config.data.video_frames < 1:
        errors.append(f"data.video_frames={config.data.video_frames} must be at least 1")
    if config.model.video_pool < 1:
        errors.append(f"model.video_pool={config.model.video_pool} must be at least 1 (1: no "
                      "pooling)")
    if config.data.num_workers < 0:
        errors.append(f"data.num_workers={config.data.num_workers} must be 0 or more")
    if config.data.num_proc is not None and config.data.num_proc < 1:
        errors.append(f"data.num_proc={config.data.num_proc} must be at least 1 (or null: "
                      "one per 20,000 records, up to the cores)")
    if config.data.shuffle_buffer < 1:
        errors.append(f"data.shuffle_buffer={config.data.shuffle_buffer} must be at least 1 "
                      "(1: the records of each shard in their order)")
    if config.data.pack and config.data.group_by_length:
        errors.append("data.pack and data.group_by_length both set; packing already fills rows, "
                      "pick one")
    return errors


def _dpo_problems(config: Config) -> list[str]:
    d = config.dpo
    errors = []
    if d.loss not in DPO_LOSSES:
        errors.append(f"dpo.loss={d.loss!r}; use one of {_one_of(DPO_LOSSES)}")
    if d.reference not in DPO_REFERENCES:
        errors.append(f"dpo.reference={d.reference!r}; use one of {_one_of(DPO_REFERENCES)}")
    if d.beta <= 0:
        errors.append(f"dpo.beta={d.beta} must be above 0 (e.g. 0.1)")
    if not 0 <= d.label_smoothing < 0.5:
        errors.append(f"dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5)")
    if d.label_smoothing and d.loss != "sigmoid":
        errors.append(f"dpo.label_smoothing applies to dpo.loss=sigmoid, not {d.loss}; remove it")
    if d.sft_weight < 0:
        errors.append(f"dpo.sft_weight={d.sft_weight} must be 0 (off) or more")
    if config.stage == "dpo":
        if config.data.pack:
            errors.append("data.pack in stage dpo: a pair's chosen and rejected answers are "
                          "scored whole, row by row; set data.pack=false")
        if d.reference == "live" and config.train.llm == "full":
            errors.append("dpo.reference=live with train.llm=full would keep a second copy of "
                          "the LLM; use dpo.reference=precompute")
        if train_is_stream(config.data.train):
            errors.append("stage dpo reads preference files, not a stream of shards; give "
                          "data.train a JSON/JSONL file (or a list or mixture of them)")
    return errors


def data_spec_problems(key: str, spec: DataSpec) -> list[str]:
    """Problems with the values of a data.train / data.eval list or mixture (its files are
    checked when a run starts: data/sources.py), each naming the source."""
    if isinstance(spec, str):
        return []
    errors = []
    for index, entry in enumerate(spec):
        where = f"{key}[{index}]"
        if isinstance(entry, str):
            if not entry.strip():
                errors.append(f"{where} is an empty path: give a JSON/JSONL file or a glob")
            continue
        if not entry.path.strip():
            errors.append(f"{where}.path is not set: give a JSON/JSONL file or a glob")
        else:
            where += f" ({entry.path})"
        if entry.weight is not None and entry.samples is not None:
            errors.append(f"{where}: weight and samples are both set; give one (weight: a "
                          "share of the weighted sources' samples; samples: "
                          f"{SAMPLES_FORMS})")
        if entry.weight is not None and not (0 < entry.weight < math.inf):
            errors.append(f"{where}: weight={entry.weight} must be above 0 (a relative share: "
                          "weight 2 draws twice the samples of weight 1)")
        if entry.samples is not None:
            try:
                parse_samples(entry.samples)
            except ValueError as err:
                errors.append(f"{where}: samples={entry.samples!r}: {err}")
    return errors


def _anyres_problems(model: ModelConfig) -> list[str]:
    if model.image_aspect not in IMAGE_ASPECTS:
        return [f"model.image_aspect={model.image_aspect!r}; use one of {_one_of(IMAGE_ASPECTS)}"]
    if model.image_aspect != "anyres":
        return []
    errors = []
    anyres = model.anyres
    bad = [g for g in anyres.grid_pinpoints if len(g) != 2 or min(g) < 1]
    if bad or not anyres.grid_pinpoints:
        errors.append(f"model.anyres.grid_pinpoints={anyres.grid_pinpoints}: give [rows, cols] "
                      "pairs of at least 1, e.g. [[1, 2], [2, 1], [2, 2]]")
    elif anyres.max_tiles is not None and not any(
            r * c <= anyres.max_tiles for r, c in anyres.grid_pinpoints):
        errors.append(f"model.anyres.max_tiles={anyres.max_tiles} leaves none of the grids "
                      f"{anyres.grid_pinpoints}; raise it or add a smaller grid")
    if anyres.multi_image not in ("tiles", "square"):
        errors.append(f"model.anyres.multi_image={anyres.multi_image!r}; use tiles or square")
    for name in ("max_tiles", "pool_max"):
        value = getattr(anyres, name)
        if value is not None and value < 1:
            errors.append(f"model.anyres.{name}={value} must be at least 1 (or null)")
    return errors


def _one_of(values) -> str:
    """Allowed values as a config file writes them: `null, 4bit, 8bit`."""
    return ", ".join("null" if value is None else str(value) for value in values)


def check_paths(config: Config, needs_images: bool) -> list[str]:
    """Problems with files a run reads, checked before anything loads; the data files'
    (data.train, data.eval: files, globs, mixtures) are data/sources.py's, and what a stream
    (data.train a folder of shards) cannot do with this config is checked here."""
    errors = []
    if config.model.llm and not Path(config.model.llm).is_dir():
        errors.append(f"model.llm folder {config.model.llm} not found")
    if train_is_stream(config.data.train):
        errors += _stream_problems(config)
    if needs_images and config.data.image_folder and not Path(config.data.image_folder).is_dir():
        errors.append(f"data.image_folder {config.data.image_folder} not found")
    vision = config.model.vision
    if needs_images and vision.pretrained and not Path(vision.pretrained).exists():
        errors.append(f"model.vision.pretrained {vision.pretrained} not found (an open_clip "
                      "weights file or a Hugging Face CLIP folder)")
    if needs_images and vision.config_file and not Path(vision.config_file).is_file():
        errors.append(f"model.vision.config_file {vision.config_file} not found")
    if config.init_from and not (Path(config.init_from) / "config.yaml").is_file():
        errors.append(f"init_from={config.init_from} is not a llava-tune run dir (no config.yaml)")
    return errors


def train_is_stream(train: DataSpec | os.PathLike) -> bool:
    """Whether data.train is a folder of shards, read as a stream (data/stream.py), rather than
    data files (a file, a glob, a list or a mixture: data/sources.py): the one place that
    decides it. Only a folder given alone is a stream; a folder inside a list or mixture is
    refused by data/sources.py (a stream cannot be one source of several, yet)."""
    return isinstance(train, (str, os.PathLike)) and bool(train) and Path(train).is_dir()


def _stream_problems(config: Config) -> list[str]:
    """What a stream (data.train a folder of shards) cannot do with this config."""
    folder = config.data.train
    errors = []
    if config.train.max_steps is None:
        errors.append(f"data.train {folder} is a folder of shards, read as a stream whose length "
                      "is not known before it is read: set train.max_steps=N (train.epochs "
                      "cannot be counted on a stream)")
    if config.data.group_by_length:
        errors.append(f"data.group_by_length=true needs every sample's length before training, "
                      f"which a stream (data.train {folder}, a folder of shards) does not know: "
                      "set data.group_by_length=false (data.pack=true fills rows on the fly)")
    return errors


def absolute_paths(config: Config) -> Config:
    """A copy whose file paths are absolute, so a run dir works from any working directory."""

    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path else path

    def absolute_spec(spec: DataSpec | None) -> DataSpec | None:
        if isinstance(spec, list):
            return [absolute(entry) if isinstance(entry, str) else dataclasses.replace(
                entry, path=absolute(entry.path), image_folder=absolute(entry.image_folder))
                for entry in spec]
        return absolute(spec)

    config = dataclasses.replace(config)
    config.model = dataclasses.replace(config.model, llm=absolute(config.model.llm))
    config.model.vision = dataclasses.replace(
        config.model.vision, pretrained=absolute(config.model.vision.pretrained),
        config_file=absolute(config.model.vision.config_file))
    config.data = dataclasses.replace(
        config.data, train=absolute_spec(config.data.train),
        eval=absolute_spec(config.data.eval),
        image_folder=absolute(config.data.image_folder),
        cache_dir=absolute(config.data.cache_dir),
        feature_cache=absolute(config.data.feature_cache))
    config.run_dir = absolute(config.run_dir)
    config.init_from = absolute(config.init_from)
    return config


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def config_from_dict(data: dict, source: str | os.PathLike = "run config") -> Config:
    """A Config from a mapping (a run dir's config.yaml); type problems raise UserError."""
    errors: list[str] = []
    config = _build(Config, data, "", errors)
    if errors:
        raise UserError(f"problems in {source}:\n  " + "\n  ".join(errors))
    return config
