"""llava-tune against what users would pick instead, side by side on identical inputs.

(One file on purpose, though long: a benchmark is copied and run on its own, on a GPU machine
too; its sections are inputs, the two systems' workers, profiling, and the command line.)

    python scripts/bench_train.py --data demo|mix [--size demo|1_8b] [--steps 40] [--warmup 5]
        [--batch-size 8] [--repeats 3] [--ours-override k=v ...] [--out results.json]
    python scripts/bench_train.py --data mix --check      # same first batch: the two losses agree
    python scripts/bench_train.py --data mix --profile    # where one step's time goes, both systems

"ours" is `llava-tune train` (the CLI, in its own process) on the finetune config of --size,
with --ours-override key=value pairs applied on top: whatever llava-tune does today is what is
measured. "peer" is what most tutorials and TRL do instead: transformers'
LlavaForConditionalGeneration loaded 4-bit (bitsandbytes NF4), peft get_peft_model (LoRA on
every linear layer of the LLM, projector trainable through modules_to_save, vision tower
frozen) and the HF Trainer with its defaults: random order, padding to the longest sample of
each batch, no packing, no length grouping; fp32 on the CPU, bf16 on a GPU.

Both start from identical weights: a finetune-stage starting point (a 1-step pretrain run at
lr=1e-12, i.e. the seeded random projector on the base LLM) exported with llava-tune's hf-llava
exporter, which the peer loads. Both see identical token ids and pixels: the peer's dataset
is llava-tune's ConversationDataset with its image slots (IMAGE_TOKEN_INDEX) turned into the
Llava image token id. LoRA r/alpha, lr, batch size, steps, warm-up, weight decay, grad
clipping, gradient checkpointing, seed and data workers come from our config (without the
--ours-override pairs) for both; LoRA dropout is 0 in both, and a step is one batch
(grad_accum 1). Two choices keep the math identical: the exported LM head's extra row for
`<image>` (never a target) is dropped in the peer, so both softmaxes run over the same
vocabulary; and the peer skips peft's prepare_model_for_kbit_training, which would upcast
its non-quantized weights to fp32 where ours keeps bf16 on a GPU.

Each run is its own process, alternating ours/peer; --repeats of each; the medians are
reported. Steady state excludes the first --warmup steps. Real tokens count every non-padding
position (image slots included) in both systems; samples/s is real tokens/s divided by the
data set's mean real tokens per sample (the same divisor for both; with packing ours has no
fixed samples per step). Peak memory: max_memory_allocated on a GPU; on the CPU each process's
own peak RSS (VmHWM) read by itself when its training ends. Not wait4's ru_maxrss of the
process: that one also counts the parent's peak (a vfork + exec child inherits it) and the
interpreter's exit, where destructors in torch's shared libraries page in up to ~120 MB of
code (measured: `import torch` alone, 507 MB in the process, 632 MB by wait4); it is kept in
the results as process_peak_mb.

--size demo: the demo's 4-layer InternLM2-architecture LM and tiny ViT (llava_tune/demo/make.py),
data.max_length 128 (demo) / 1024 (mix). --size 1_8b: InternLM2-chat-1.8B's shapes with
random weights (vocabulary 92544; the text is tokenized by a 768-piece byte-fallback demo
tokenizer trained on the data, which gives the mix's words about as many tokens as
InternLM2's own tokenizer) and a random ViT-L/14-336, data.max_length 2048, GPU only. Models, data, the starting point and its export are built once under
--work and reused.

--check: one identical batch (the first --batch-size records) through both, first-step loss of
each (ours: metrics.jsonl, the mean over label tokens; peer: the Trainer's compute_loss).
--profile: a short torch.profiler window per system after --warmup steps: milliseconds per
step by phase (GPU synchronized at phase boundaries) and the top ops by self CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_tune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

VIT_L_336 = "ViT-L-14-336-quickgelu"
"""open_clip config whose shapes the 1_8b size's random vision tower takes."""


@dataclass(frozen=True)
class Size:
    config: str
    """Our finetune config for this size, relative to the repository."""
    image_size: dict[str, int]
    """Generated images' side (demo) or long side (mix), per --data."""
    max_length: dict[str, int]
    """data.max_length per --data."""
    gpu_only: bool = False


SIZES = {
    "demo": Size("configs/demo/finetune.yaml", {"demo": 112, "mix": 160}, {"demo": 128, "mix": 1024}),
    "1_8b": Size("configs/internlm2_chat_1_8b/finetune.yaml", {"demo": 336, "mix": 640},
                 {"demo": 2048, "mix": 2048}, gpu_only=True),
}


@dataclass
class Setup:
    """What both systems share: our config file, the models, the data and the work folder."""

    config: Path
    llm: Path
    vision_name: str
    vision_config: Path | None
    vision_weights: Path
    data: Path
    image_folder: Path
    max_length: int
    work: Path
    """Holds cache/ (tokenized data, InternLM2 conversions), start/ (the starting point),
    hf-llava/ (its export) and runs/."""

    def overrides(self) -> list[str]:
        """key=value pairs that point our config at this setup, for both systems."""
        items = [f"model.llm={self.llm}", f"model.vision.name={self.vision_name}",
                 f"model.vision.pretrained={self.vision_weights}",
                 f"data.train={self.data}", f"data.image_folder={self.image_folder}",
                 f"data.max_length={self.max_length}", f"data.cache_dir={self.work / 'cache'}",
                 "train.lora.dropout=0", "train.grad_accum=1", "train.save_every=null",
                 # The peer freezes the tower and batches in random order: so do we here.
                 "train.vision=frozen", "data.group_by_length=false"]
        if self.vision_config is not None:
            items.append(f"model.vision.config_file={self.vision_config}")
        return items

    @property
    def start(self) -> Path:
        return self.work / "start"

    @property
    def export(self) -> Path:
        return self.work / "hf-llava"


# --------------------------------------------------------------------------- building inputs


def _texts(files: list[Path]) -> list[str]:
    from llava_tune.demo import tokenizer as demo_tokenizer

    return [t for f in files for t in demo_tokenizer.llava_texts(json.loads(f.read_text()))]


def prepare_data(kind: str, size: str, work: Path, records: int,
                 seed: int) -> tuple[Path, Path, list[Path]]:
    """Generate the data once: (data file, image folder, the files the tokenizer learns from)."""
    image_size = SIZES[size].image_size[kind]
    out = work / "data" / f"{kind}-{image_size}px-{records}-seed{seed}"
    if kind == "demo":
        from llava_tune.demo import shapes

        data = out / "finetune.json"
        if not (out / ".complete").is_file():
            shapes.generate(out, n_train=math.ceil(records / 2), n_heldout=0, seed=seed,
                            image_size=image_size)
            (out / ".complete").touch()
        return data, out / "images", [out / "text.json", data]
    if kind == "mix":
        from llava_tune.demo import mix

        if not (out / ".complete").is_file():
            mix.generate_mix(out, records, seed, image_size)
            (out / ".complete").touch()
        return out / "mix.json", out / "images", [out / "mix.json"]
    raise UserError(f"--data {kind!r}: use demo or mix")


def prepare(size: str, kind: str, work: Path, records: int = 2000, seed: int = 0) -> Setup:
    """Data, models, the starting point and its hf-llava export for --size/--data, built once
    under work/SIZE-KIND and reused."""
    data, images, text_files = prepare_data(kind, size, work, records, seed)
    home = work / f"{size}-{kind}-{records}-seed{seed}"
    models = home / "models"
    if not (models / ".complete").is_file():
        from llava_tune.demo import make as make_demo

        shutil.rmtree(models, ignore_errors=True)
        if size == "demo":
            make_demo.make_lm(models / "lm", text_files, seed)
            make_demo.make_vision(models / "vision", seed)
        else:
            import open_clip

            from llava_tune.demo import tokenizer as demo_tokenizer
            from llava_tune.demo.random_checkpoint import write_checkpoint

            # 768 pieces: the mix's words then take about as many tokens as InternLM2's own
            # tokenizer gives them (measured: 1.15x), so sequence lengths are realistic.
            tok = demo_tokenizer.train_tokenizer(_texts(text_files), models / "tokenizer", 768)
            write_checkpoint("internlm2-chat-1_8b", models / "lm", tokenizer=tok, seed=seed)
            make_demo.make_vision(models / "vision", seed, config=open_clip.get_model_config(VIT_L_336),
                                  name="bench-vit-l-14-336")
        (models / ".complete").touch()
    name = "demo-vit" if size == "demo" else "bench-vit-l-14-336"
    setup = Setup(config=ROOT / SIZES[size].config, llm=models / "lm", vision_name=name,
                  vision_config=models / "vision" / f"{name}.json",
                  vision_weights=models / "vision" / f"{name}.safetensors", data=data,
                  image_folder=images, max_length=SIZES[size].max_length[kind], work=home)
    prepare_start(setup)
    return setup


@contextlib.contextmanager
def _environment(**values: str):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def prepare_start(setup: Setup) -> None:
    """The finetune stage's starting point (base LLM + the seeded random projector after one
    pretrain step at lr 1e-12, which leaves it as it was; lr 0 is not a valid config) and its
    hf-llava export, for the peer to load. Both systems start from this run's weights."""
    marker = setup.work / ".start-complete"
    if marker.is_file():
        return
    from llava_tune.cli import main as cli

    shutil.rmtree(setup.start, ignore_errors=True)
    shutil.rmtree(setup.export, ignore_errors=True)
    overrides = setup.overrides() + [
        "stage=pretrain", "init_from=null", "train.llm=frozen", "model.quantization=null",
        "train.max_steps=1", "train.lr=1e-12", "train.batch_size=1", "train.log_every=1",
        "train.gradient_checkpointing=false", "data.num_workers=0", f"run_dir={setup.start}"]
    with _environment(LLAVA_TUNE_CACHE=str(setup.work / "cache")):
        if cli(["train", str(setup.config), *overrides]) != 0:
            raise RuntimeError(f"the starting-point run {setup.start} failed (see above)")
        if cli(["export", str(setup.start), str(setup.export), "--format", "hf-llava"]) != 0:
            raise RuntimeError(f"exporting {setup.start} as hf-llava failed (see above)")
    _free_memory()
    marker.touch()


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- shared dataset


def our_config(config_file: Path, overrides: list[str]):
    from llava_tune.config import load_config

    return load_config(config_file, overrides)


def shared_dataset(config, export: Path):
    """Our ConversationDataset for `config`, as our trainer builds it (same tokenizer,
    template, max_length, image processing and image slots), its settings read from the
    hf-llava export so that no vision tower has to load. Returns (dataset, image token id of
    the Llava model, pad id)."""
    from llava_tune.assembly.llm import load_tokenizer
    from llava_tune.data.datasets import ConversationDataset
    from llava_tune.data.image import ImageProcessor
    from llava_tune.data.template import ChatTemplate, add_image_token, get_template

    llava = json.loads((export / "config.json").read_text())
    pre = json.loads((export / "preprocessor_config.json").read_text()) \
        if (export / "preprocessor_config.json").is_file() \
        else json.loads((export / "processor_config.json").read_text())["image_processor"]
    tokenizer = load_tokenizer(config.model.llm)
    add_image_token(tokenizer)  # as the trainer's model build does for stages with images
    template = get_template(config.model.template)
    if config.model.system:
        template = ChatTemplate(**{**template.__dict__, "default_system": config.model.system})
    processor = ImageProcessor(pre["crop_size"]["height"], pre["image_mean"], pre["image_std"])
    dataset = ConversationDataset(
        config.data.train, tokenizer, template, config.data.max_length,
        image_folder=config.data.image_folder, image_processor=processor,
        num_image_tokens=llava["image_seq_length"], max_bad_fraction=config.data.max_bad_fraction,
        cache_dir=config.data.cache_dir)
    image_token_id = llava.get("image_token_id", llava.get("image_token_index"))
    return dataset, image_token_id, tokenizer.pad_token_id


def data_stats(setup: Setup) -> dict[str, Any]:
    """Samples, real tokens per sample (images expanded) and the text-only share."""
    with _environment(LLAVA_TUNE_CACHE=str(setup.work / "cache")):
        dataset, _, _ = shared_dataset(our_config(setup.config, setup.overrides()), setup.export)
    lengths = dataset.lengths()
    images = dataset.table["images"]
    return {"file": str(setup.data), "samples": len(lengths),
            "mean_tokens": round(statistics.fmean(lengths), 2), "max_tokens": max(lengths),
            "text_only_fraction": round(sum(not i for i in images) / len(images), 4),
            "truncated": dataset.report.truncated, "max_length": setup.max_length}


# --------------------------------------------------------------------------- running one system


@dataclass
class Run:
    returncode: int
    peak_rss_mb: float
    seconds: float
    log: Path


def spawn(command: list[str], log: Path, work: Path) -> Run:
    """Run `command` in a fresh interpreter, output to `log`; its own peak RSS from wait4."""
    env = {**os.environ, "LLAVA_TUNE_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, not by Popen
    # ru_maxrss is in KiB on Linux.
    return Run(proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start, log)


def _failed(what: str, run: Run) -> RuntimeError:
    tail = "\n".join(run.log.read_text(errors="replace").splitlines()[-30:])
    return RuntimeError(f"{what} failed (exit {run.returncode}); last lines of {run.log}:\n{tail}")


def ours_overrides(setup: Setup, run_dir: Path, steps: int, batch_size: int, log_every: int,
                   extra: list[str], data: Path | None = None) -> list[str]:
    items = setup.overrides() + [f"init_from={setup.start}", f"run_dir={run_dir}",
                                 f"train.max_steps={steps}", f"train.batch_size={batch_size}",
                                 f"train.log_every={log_every}"]
    if data is not None:
        items.append(f"data.train={data}")
    return items + list(extra)


def run_ours(setup: Setup, name: str, steps: int, warmup: int, batch_size: int,
             extra: list[str]) -> dict[str, Any]:
    """One `llava-tune train` run; steady state from its metrics.jsonl windows after `warmup`."""
    run_dir = setup.work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    # Logging every `warmup` steps makes the first window exactly the warm-up.
    overrides = ours_overrides(setup, run_dir, steps, batch_size, warmup, extra)
    run = spawn([sys.executable, "-m", "llava_tune", "train", str(setup.config), *overrides],
                setup.work / "logs" / f"{name}.log", setup.work)
    if run.returncode != 0:
        raise _failed(f"ours ({name})", run)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if r["step"] > warmup]
    if not steady or "tokens" not in steady[0]:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no steady-state window with token counts")
    return {"tokens": sum(r["tokens"] for r in steady), "seconds": sum(r["seconds"] for r in steady),
            "steps": steps - warmup,
            "peak_mb": rows[-1]["memory_mb"],  # the trainer's own peak (module docstring)
            "process_peak_mb": round(run.peak_rss_mb, 1),
            "process_s": round(run.seconds, 2)}


def run_peer(setup: Setup, name: str, steps: int, warmup: int, batch_size: int, mode: str = "bench",
             data: Path | None = None, in_process: bool = False) -> dict[str, Any]:
    """One peer run in its own process (this script's --worker peer), or in this one when
    nothing is measured (`in_process`, for --check)."""
    out_dir = setup.work / "runs" / name
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    overrides = setup.overrides() + [f"train.batch_size={batch_size}"]
    if data is not None:
        overrides.append(f"data.train={data}")
    spec = {"config": str(setup.config), "overrides": overrides, "export": str(setup.export),
            "llm": str(setup.llm), "output_dir": str(out_dir), "steps": steps, "warmup": warmup,
            "mode": mode, "result": str(out_dir / "result.json")}
    (out_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    if in_process:
        assert mode != "bench", "a measured run needs its own process"
        with _environment(LLAVA_TUNE_CACHE=str(setup.work / "cache")):
            peer_worker(spec)
        return json.loads((out_dir / "result.json").read_text())
    run = spawn([sys.executable, str(Path(__file__).resolve()), "--worker", "peer",
                 str(out_dir / "spec.json")], setup.work / "logs" / f"{name}.log", setup.work)
    if run.returncode != 0:
        raise _failed(f"peer ({name})", run)
    result = json.loads((out_dir / "result.json").read_text())
    if mode == "bench":
        result["peak_mb"] = result["peak_gpu_mb"] if _gpu_available() else result["peak_rss_mb"]
        result["process_peak_mb"] = round(run.peak_rss_mb, 1)
        result["process_s"] = round(run.seconds, 2)
    return result


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------- the peer (worker)


class PeerDataset:
    """Our dataset's items for transformers' Llava: image slots become its image token id."""

    def __init__(self, dataset, image_token_id: int) -> None:
        self.dataset = dataset
        self.image_token_id = image_token_id

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        from llava_tune.constants import IMAGE_TOKEN_INDEX

        item = self.dataset[index]
        if "error" in item:
            raise RuntimeError(f"sample {item['id']}: {item['error']}")
        ids = item["input_ids"].clone()
        ids[ids == IMAGE_TOKEN_INDEX] = self.image_token_id
        return {"input_ids": ids, "labels": item["labels"], "pixel_values": item.get("pixel_values")}


class PeerCollator:
    """Pads to the longest sample of the batch (labels with -100), as a user's collator does."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        import torch
        from torch.nn.utils.rnn import pad_sequence

        ids = pad_sequence([i["input_ids"] for i in items], batch_first=True,
                           padding_value=self.pad_token_id)
        labels = pad_sequence([i["labels"] for i in items], batch_first=True, padding_value=-100)
        mask = pad_sequence([torch.ones_like(i["input_ids"]) for i in items], batch_first=True)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        images = [i["pixel_values"] for i in items if i["pixel_values"] is not None]
        if images:
            batch["pixel_values"] = torch.cat(images)
        return batch


def load_peer_model(config, export: Path, llm_vocab: int):
    """The exported Llava, quantized as our config says, with LoRA on every linear layer of
    the LLM and a trainable projector."""
    import peft
    import torch
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    from llava_tune.assembly.llm import resolve_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(config.model.dtype, device)
    skip = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
    quantization = None
    if config.model.quantization == "4bit":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)
    elif config.model.quantization == "8bit":
        quantization = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    model = LlavaForConditionalGeneration.from_pretrained(
        export, dtype=dtype, quantization_config=quantization, device_map={"": device})
    head = model.lm_head
    if head.out_features > llm_vocab:
        # The exporter gave `<image>` a vocabulary row of its own; it is never a target, but
        # its logit would enter every softmax. Dropping it gives both systems the same
        # vocabulary, so their losses can be compared.
        trimmed = torch.nn.Linear(head.in_features, llm_vocab, bias=False, device=head.weight.device,
                                  dtype=head.weight.dtype)
        trimmed.weight.data.copy_(head.weight.data[:llm_vocab])
        model.lm_head = trimmed
        model.config.text_config.vocab_size = llm_vocab
    linear_types = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    prefix = "model.language_model."
    targets = config.train.lora.target_modules
    if targets == "all-linear":
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if name.startswith(prefix) and isinstance(module, linear_types)})
    targets = [targets] if isinstance(targets, str) else targets
    lora = peft.LoraConfig(
        r=config.train.lora.r, lora_alpha=config.train.lora.alpha, lora_dropout=0.0,
        target_modules=rf"{re.escape(prefix)}.*\.({'|'.join(targets)})",
        modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    quantized = [n for n, m in model.named_modules()
                 if type(m).__name__ in ("Linear4bit", "Linear8bitLt") and ".lora_" not in n]
    assert all("language_model" in n for n in quantized), "only the LLM may be quantized"
    return model


def peer_worker(spec: dict[str, Any]) -> None:
    """Train the peer as spec says and write its result JSON (see run_peer)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from llava_tune.cli import quiet_libraries
    from llava_tune.training.metrics import peak_rss_mb

    quiet_libraries()
    config = our_config(Path(spec["config"]), spec["overrides"])
    tc = config.train
    export = Path(spec["export"])
    dataset, image_token_id, pad_id = shared_dataset(config, export)
    llm_vocab = json.loads((Path(spec["llm"]) / "config.json").read_text())["vocab_size"]
    model = load_peer_model(config, export, llm_vocab)
    collator = PeerCollator(pad_id)
    cuda = torch.cuda.is_available()
    steps, warmup, mode = spec["steps"], spec["warmup"], spec["mode"]
    precision = tc.mixed_precision
    if precision == "auto":  # what our config's "auto" means: bf16 on GPUs that have it
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    class LossTrainer(Trainer):
        losses: list[float] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    args = TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=1, learning_rate=tc.lr, weight_decay=tc.weight_decay,
        lr_scheduler_type="cosine", warmup_steps=round(tc.warmup_ratio * steps),
        max_grad_norm=tc.max_grad_norm, max_steps=steps, logging_strategy="no",
        save_strategy="no", report_to="none", disable_tqdm=True, seed=tc.seed,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not cuda,
        dataloader_num_workers=config.data.num_workers, remove_unused_columns=False,
        gradient_checkpointing=tc.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    timer = StepTimes()
    # Real tokens per forward (= per step), counted where the batch arrives: the collator may
    # run in DataLoader workers. Kept on the device, so counting never waits for the GPU.
    tokens: list[torch.Tensor] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: tokens.append(kwargs["attention_mask"].sum()), with_kwargs=True)
    trainer_class = LossTrainer if mode == "check" else Trainer
    trainer = trainer_class(model=model, args=args, train_dataset=PeerDataset(dataset, image_token_id),
                            data_collator=collator, callbacks=[timer])
    if mode == "profile":
        profile = profiled(trainer.train, warmup, steps - warmup)
    else:
        trainer.train()
    result: dict[str, Any] = {"steps": steps, "trainable": sum(
        p.numel() for p in model.parameters() if p.requires_grad)}
    if mode == "bench":
        assert len(tokens) == steps == len(timer.times), (len(tokens), len(timer.times))
        result.update(tokens=int(sum(t.item() for t in tokens[warmup:])),
                      seconds=timer.times[-1] - timer.times[warmup - 1],
                      steps=steps - warmup,
                      peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                      peak_rss_mb=peak_rss_mb())
    elif mode == "check":
        result["losses"] = LossTrainer.losses
    elif mode == "profile":
        result["profile"] = {**profile, "tokens_per_step": sum(t.item() for t in tokens[warmup:])
                             / (steps - warmup)}
    Path(spec["result"]).write_text(json.dumps(result, indent=2))


def ours_profile_worker(spec: dict[str, Any]) -> None:
    """`llava-tune train` in this process, under the profiler (see `profiled`)."""
    from llava_tune.cli import main as cli

    def train() -> None:
        if cli(["train", spec["config"], *spec["overrides"]]) != 0:
            raise RuntimeError("llava-tune train failed")

    Path(spec["result"]).write_text(json.dumps({"profile": profiled(train, spec["warmup"],
                                                                     spec["steps"] - spec["warmup"])}))


# --------------------------------------------------------------------------- profiling


PHASES = ("data (fetch + collate)", "vision tower fwd", "projector fwd", "LLM fwd (embed + layers)",
          "LM head + loss fwd", "backward (+ grad clip)", "optimizer step",
          "other (loop, zero_grad, lr, to-device)")


class PhaseTimer:
    """Splits training steps into PHASES by wall clock, from hooks every torch program passes
    through: global module forward hooks (the first module called after an optimizer step is
    the model; its vision tower, projector and lm_head are found by class and name), global
    optimizer step hooks, and the map-style DataLoader fetch (dataset items + collate, with
    num_workers=0). Forwards re-run by gradient checkpointing fall inside the backward phase and
    are ignored. On a GPU every boundary synchronizes, so phases own their kernels."""

    VISION = ("VisionTower", "CLIPVisionModel")
    PROJECTOR = ("Projector", "LlavaMultiModalProjector")

    def __init__(self, warmup: int, active: int) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.warmup, self.active = warmup, active
        self.steps = 0
        self.recording = False
        self.phase = PHASES[-1]
        self.last = 0.0
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.top: Any = None
        self.roles: dict[int, str] = {}
        self.on_step: list = []

    def _switch(self, phase: str) -> None:
        if not self.recording:
            self.phase = phase
            return
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[self.phase] += now - self.last
        self.phase, self.last = phase, now

    def _find_parts(self, top) -> None:
        for name, module in top.named_modules():
            kind = type(module).__name__
            if kind in self.VISION and "vision" not in self.roles.values():
                self.roles[id(module)] = "vision"
            elif kind in self.PROJECTOR:
                self.roles[id(module)] = "projector"
            elif name.endswith("lm_head"):
                self.roles[id(module)] = "head"

    def pre_forward(self, module, args) -> None:
        if self.phase in ("backward (+ grad clip)", "optimizer step"):
            return  # gradient checkpointing's recomputation
        if self.top is None and self.steps >= 1:
            self.top = module
            self._find_parts(module)
        if module is self.top and self.phase not in PHASES[1:5]:
            self._switch("LLM fwd (embed + layers)")
        role = self.roles.get(id(module))
        if role == "vision" and self.phase == "LLM fwd (embed + layers)":
            self._switch("vision tower fwd")
        elif role == "projector" and self.phase == "LLM fwd (embed + layers)":
            self._switch("projector fwd")
        elif role == "head" and self.phase == "LLM fwd (embed + layers)":
            self._switch("LM head + loss fwd")

    def post_forward(self, module, args, output) -> None:
        role = self.roles.get(id(module))
        if role == "vision" and self.phase == "vision tower fwd":
            self._switch("LLM fwd (embed + layers)")
        elif role == "projector" and self.phase == "projector fwd":
            self._switch("LLM fwd (embed + layers)")
        elif module is self.top and self.phase in PHASES[1:5]:
            self._switch("backward (+ grad clip)")

    def pre_step(self, optimizer, args, kwargs) -> None:
        self._switch("optimizer step")

    def post_step(self, optimizer, args, kwargs) -> None:
        self._switch(PHASES[-1])
        self.steps += 1
        for callback in self.on_step:
            callback()
        if self.steps == self.warmup:
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.recording, self.last = True, time.perf_counter()
            self.totals = dict.fromkeys(PHASES, 0.0)
        elif self.steps == self.warmup + self.active:
            self.recording = False

    @contextlib.contextmanager
    def installed(self):
        import torch
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )
        from torch.utils.data._utils import fetch

        handles = [torch.nn.modules.module.register_module_forward_pre_hook(self.pre_forward),
                   torch.nn.modules.module.register_module_forward_hook(self.post_forward),
                   register_optimizer_step_pre_hook(self.pre_step),
                   register_optimizer_step_post_hook(self.post_step)]
        original = fetch._MapDatasetFetcher.fetch

        def timed_fetch(fetcher, index):
            outer = self.phase
            self._switch(PHASES[0])
            try:
                return original(fetcher, index)
            finally:
                self._switch(outer)

        fetch._MapDatasetFetcher.fetch = timed_fetch
        try:
            yield self
        finally:
            fetch._MapDatasetFetcher.fetch = original
            for handle in handles:
                handle.remove()


def profiled(train, warmup: int, active: int) -> dict[str, Any]:
    """Run `train()` with the PhaseTimer and torch.profiler recording steps warmup+1 ..
    warmup+active; ms per step by phase and the top ops by self CPU (and GPU) time."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    timer = PhaseTimer(warmup, active)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if timer.cuda else [])
    steps = schedule(wait=max(0, warmup - 1), warmup=min(1, warmup), active=active, repeat=1)
    with profile(activities=activities, schedule=steps) as prof:
        timer.on_step.append(prof.step)
        with timer.installed():
            train()
    ms = {phase: 1000 * t / active for phase, t in timer.totals.items()}
    averages = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    events = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    top = [{"op": e.key, "calls_per_step": e.count / active,
            "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / active,
            "self_gpu_ms_per_step": getattr(e, "self_device_time_total", 0) / 1000 / active}
           for e in events[:15]]
    if torch.cuda.is_available():
        by_gpu = sorted(averages, key=lambda e: getattr(e, "self_device_time_total", 0),
                        reverse=True)
        top_gpu = [{"op": e.key, "self_gpu_ms_per_step": e.self_device_time_total / 1000 / active}
                   for e in by_gpu[:15]]
    else:
        top_gpu = []
    return {"ms_per_step": ms, "step_ms": sum(ms.values()), "steps": active, "top_ops": top,
            "top_gpu_ops": top_gpu}


def run_profiles(setup: Setup, warmup: int, active: int, batch_size: int, extra: list[str]) -> dict:
    steps = warmup + active
    ours_dir = setup.work / "runs" / "profile-ours"
    shutil.rmtree(ours_dir, ignore_errors=True)
    ours_dir.mkdir(parents=True)
    spec = {"config": str(setup.config), "warmup": warmup, "steps": steps,
            "overrides": ours_overrides(setup, ours_dir / "run", steps, batch_size, warmup, extra),
            "result": str(ours_dir / "result.json")}
    (ours_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    run = spawn([sys.executable, str(Path(__file__).resolve()), "--worker", "profile-ours",
                 str(ours_dir / "spec.json")], setup.work / "logs" / "profile-ours.log", setup.work)
    if run.returncode != 0:
        raise _failed("ours (profile)", run)
    ours = json.loads((ours_dir / "result.json").read_text())["profile"]
    rows = [json.loads(line) for line in (ours_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    ours["tokens_per_step"] = sum(r["tokens"] for r in rows if r["step"] > warmup) / active
    peer = run_peer(setup, "profile-peer", steps, warmup, batch_size, mode="profile")["profile"]
    return {"ours": ours, "peer": peer}


def print_profiles(profiles: dict) -> None:
    ours, peer = profiles["ours"], profiles["peer"]
    print(f"\nwhere a step's time goes (ms per step over {ours['steps']} profiled steps)")
    print(f"{'phase':42s} {'ours':>16s} {'peer':>16s}")
    for phase in PHASES:
        cells = [f"{p['ms_per_step'][phase]:9.1f} {100 * p['ms_per_step'][phase] / p['step_ms']:4.0f}%"
                 for p in (ours, peer)]
        print(f"{phase:42s} {cells[0]:>16s} {cells[1]:>16s}")
    print(f"{'total':42s} {ours['step_ms']:9.1f}       {peer['step_ms']:9.1f}")
    print(f"{'real tokens per step':42s} {ours['tokens_per_step']:9.0f}       "
          f"{peer['tokens_per_step']:9.0f}")
    for name, p in profiles.items():
        print(f"\ntop ops by self CPU time, {name} (ms per step)")
        for e in p["top_ops"]:
            gpu = f"  gpu {e['self_gpu_ms_per_step']:8.2f}" if e["self_gpu_ms_per_step"] else ""
            print(f"  {e['self_cpu_ms_per_step']:9.2f}{gpu}  x{e['calls_per_step']:<6g} {e['op'][:70]}")
        if p["top_gpu_ops"]:
            print(f"top ops by GPU time, {name} (ms per step)")
            for e in p["top_gpu_ops"]:
                print(f"  {e['self_gpu_ms_per_step']:9.2f}  {e['op'][:80]}")


# --------------------------------------------------------------------------- check, bench


def first_records(data: Path, n: int, out: Path) -> Path:
    """The first `n` records of `data`, as their own file beside the others' work."""
    from llava_tune.data.formats import read_json_records

    records, _ = read_json_records(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records[:n], indent=1))
    return out


def check_identity(setup: Setup, batch_size: int, extra: list[str] = (),
                   in_process: bool = False) -> dict[str, Any]:
    """First-step loss of both systems on one identical batch: the first `batch_size`
    records (a file of exactly one batch, so any order gives the same batch). Nothing is
    timed, so `in_process` may run both in this interpreter (faster; the tests do)."""
    data = first_records(setup.data, batch_size, setup.work / "check" / "first-batch.json")
    ours, ours_trainable = run_ours_check(setup, data, batch_size, list(extra), in_process)
    peer = run_peer(setup, "check-peer", 1, 1, batch_size, mode="check", data=data,
                    in_process=in_process)
    return {"ours": ours, "peer": peer["losses"][0], "abs_diff": abs(ours - peer["losses"][0]),
            "trainable": {"ours": ours_trainable, "peer": peer["trainable"]}}


def run_ours_check(setup: Setup, data: Path, batch_size: int, extra: list[str],
                   in_process: bool = False) -> tuple[float, int | None]:
    """Ours' first-step loss, and its trainable parameter count as its log states it (None
    when the log's wording changed)."""
    run_dir = setup.work / "runs" / "check-ours"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = ours_overrides(setup, run_dir, 1, batch_size, 1, extra, data=data)
    log = setup.work / "logs" / "check-ours.log"
    if in_process:
        import io

        from llava_tune.cli import main as cli

        captured = io.StringIO()
        with _environment(LLAVA_TUNE_CACHE=str(setup.work / "cache")), \
                contextlib.redirect_stderr(captured):
            code = cli(["train", str(setup.config), *overrides])
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(captured.getvalue())
        if code != 0:
            raise RuntimeError(f"ours (check) failed (exit {code}):\n{captured.getvalue()[-3000:]}")
    else:
        run = spawn([sys.executable, "-m", "llava_tune", "train", str(setup.config), *overrides],
                    log, setup.work)
        if run.returncode != 0:
            raise _failed("ours (check)", run)
    counts = re.findall(r"^\s+\w+\s+([\d,]+) trainable of", log.read_text(), re.MULTILINE)
    trainable = sum(int(c.replace(",", "")) for c in counts) if counts else None
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"], trainable


def _summary(tokens: int, seconds: float, mean_tokens: float) -> dict[str, float]:
    rate = tokens / seconds
    return {"tokens_per_s": rate, "samples_per_s": rate / mean_tokens}


def benchmark(setup: Setup, steps: int, warmup: int, batch_size: int, repeats: int,
              extra: list[str], log=print) -> dict[str, Any]:
    """Alternate ours/peer `repeats` times; medians of steady tokens/s, samples/s, peak MB."""
    stats = data_stats(setup)
    runs: dict[str, list[dict]] = {"ours": [], "peer": []}
    for i in range(1, repeats + 1):
        for system in ("ours", "peer"):
            log(f"[{system} {i}/{repeats}] {steps} steps ...")
            if system == "ours":
                r = run_ours(setup, f"ours-{i}", steps, warmup, batch_size, extra)
            else:
                r = run_peer(setup, f"peer-{i}", steps, warmup, batch_size)
            r.update(_summary(r["tokens"], r["seconds"], stats["mean_tokens"]))
            runs[system].append(r)
            log(f"[{system} {i}/{repeats}] {r['tokens_per_s']:.1f} real tokens/s, "
                f"peak {r['peak_mb']:.0f} MB")
    keys = ("tokens_per_s", "samples_per_s", "peak_mb")
    medians = {s: {k: statistics.median(r[k] for r in runs[s]) for k in keys} for s in runs}
    ratio = {k: medians["ours"][k] / medians["peer"][k] for k in keys}
    return {"data": stats, "ours": {"runs": runs["ours"], "median": medians["ours"]},
            "peer": {"runs": runs["peer"], "median": medians["peer"]}, "ours_over_peer": ratio}


def print_table(result: dict[str, Any], memory: str) -> None:
    rows = [("ours (llava-tune)", result["ours"]["median"]),
            ("peer (HF Trainer)", result["peer"]["median"])]
    print(f"\n{'':20s} {'real tokens/s':>14s} {'samples/s':>10s} {'peak ' + memory:>18s}")
    for name, m in rows:
        print(f"{name:20s} {m['tokens_per_s']:14.1f} {m['samples_per_s']:10.2f} "
              f"{m['peak_mb']:15.0f} MB")
    r = result["ours_over_peer"]
    print(f"{'ours / peer':20s} {r['tokens_per_s']:13.2f}x {r['samples_per_s']:9.2f}x "
          f"{r['peak_mb']:17.2f}x")


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["demo", "mix"], default="demo")
    parser.add_argument("--size", choices=list(SIZES), default="demo")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the rates")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each system")
    parser.add_argument("--ours-override", action="extend", nargs="+", default=[], metavar="K=V",
                        help="key=value for ours only, e.g. data.pack=true")
    parser.add_argument("--records", type=int, default=2000, help="records in the generated data")
    parser.add_argument("--seed", type=int, default=0, help="data and model seed")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench",
                        help="where data, models, exports and runs go (reused)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="only compare the first-step loss on one identical batch")
    mode.add_argument("--profile", action="store_true",
                      help="only profile a short window of each system")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps after --warmup")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, spec = args.worker
        worker = {"peer": peer_worker, "profile-ours": ours_profile_worker}[kind]
        worker(json.loads(Path(spec).read_text()))
        return 0
    try:
        return _main(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    if min(args.batch_size, args.repeats, args.warmup, args.records, args.profile_steps) < 1:
        raise UserError("--batch-size, --repeats, --warmup, --records and --profile-steps must be >= 1")
    if args.steps <= args.warmup:
        raise UserError(f"--steps {args.steps} leaves nothing after --warmup {args.warmup}; "
                        "give more --steps")
    for item in args.ours_override:
        if "=" not in item:
            raise UserError(f"--ours-override {item!r} is not key=value (e.g. data.pack=true)")
    gpu = _gpu_available()
    if SIZES[args.size].gpu_only and not gpu:
        raise UserError(f"--size {args.size} needs a GPU: a 1.8B LLM with a ViT-L/14-336 takes "
                        "minutes per step on a CPU; use --size demo here")
    from llava_tune.cli import quiet_libraries

    quiet_libraries()
    work = args.work.resolve()
    print(f"preparing {args.size} models and {args.data} data under {work} ...", file=sys.stderr)
    setup = prepare(args.size, args.data, work, args.records, args.seed)
    device = _device_name()
    settings = {**{k: v for k, v in vars(args).items() if k not in ("worker", "out", "work")},
                "device": device, "work": str(setup.work)}
    if args.check:
        result = check_identity(setup, args.batch_size, args.ours_override)
        tolerance = 1e-4 if not gpu else 2e-2  # bf16 autocast on a GPU
        ok = result["abs_diff"] <= tolerance
        print(f"first-step loss on one identical batch of {args.batch_size}: "
              f"ours {result['ours']:.6f}, peer {result['peer']:.6f}, |diff| {result['abs_diff']:.2e} "
              f"({'OK' if ok else 'MISMATCH'}, tolerance {tolerance:g})")
        print(f"trainable parameters: ours {result['trainable']['ours']}, "
              f"peer {result['trainable']['peer']}")
        _write(args.out, {"settings": settings, "check": {**result, "tolerance": tolerance, "ok": ok}})
        return 0 if ok else 1
    if args.profile:
        profiles = run_profiles(setup, args.warmup, args.profile_steps, args.batch_size,
                                args.ours_override)
        print_profiles(profiles)
        _write(args.out, {"settings": settings, "profile": profiles})
        return 0
    result = benchmark(setup, args.steps, args.warmup, args.batch_size, args.repeats,
                       args.ours_override, log=lambda m: print(m, file=sys.stderr))
    print(f"\n--size {args.size} --data {args.data} on {device}: {args.steps} steps "
          f"({args.warmup} warm-up) x batch {args.batch_size}, median of {args.repeats}; "
          f"ours with {args.ours_override or 'its config as is'}")
    print_table(result, "GPU alloc" if gpu else "RSS")
    _write(args.out, {"settings": settings, **result})
    return 0


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _write(path: Path | None, data: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"results in {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
