"""The peer, what most tutorials and TRL do instead of llava-tune: transformers'
LlavaForConditionalGeneration loaded from the hf-llava export (LlavaNextForConditionalGeneration
from the hf-llava-next export for --data anyres; 4-bit NF4 as our config says),
peft LoRA on every linear layer of the LLM with a trainable projector, and the HF Trainer on
our dataset's items. `peer_worker` runs in its own process (bench_train.py --worker peer SPEC)
or, when nothing is timed, in the caller's."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from benchlib.data import our_config, shared_dataset
from benchlib.profile import profiled


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
        out = {"input_ids": ids, "labels": item["labels"], "pixel_values": item.get("pixel_values")}
        media = item.get("media", [])
        if any(m.kind == "image" and m.size != (0, 0) for m in media):
            # Tiles: LlavaNext takes one image's overview + tiles per row of pixel_values,
            # and the image's (height, width) to unpad them.
            if len(media) != 1:
                raise RuntimeError(f"sample {item['id']}: the LlavaNext peer takes one image "
                                   f"per sample, it has {len(media)}")
            out["image_sizes"] = list(media[0].size)
        return out


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
        if images and "image_sizes" in items[0]:
            # LlavaNext: [images, most tiles, 3, S, S], zero rows after an image's own tiles
            # (its image_sizes say how many are real), as its image processor pads them.
            batch["pixel_values"] = pad_sequence(images, batch_first=True)
            batch["image_sizes"] = torch.tensor([i["image_sizes"] for i in items if "image_sizes" in i])
        elif images:
            batch["pixel_values"] = torch.cat(images)
        return batch


def load_peer_model(config, export: Path, llm_vocab: int):
    """The exported Llava (or LlavaNext), quantized as our config says, with LoRA on every
    linear layer of the LLM and a trainable projector (and image_newline, as ours trains it)."""
    import peft
    import torch
    from transformers import (
        BitsAndBytesConfig,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
    )

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
    next_ = json.loads((export / "config.json").read_text())["model_type"] == "llava_next"
    model_class = LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration
    model = model_class.from_pretrained(
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
    if next_:
        model.base_model.model.model.image_newline.requires_grad_(True)
    quantized = [n for n, m in model.named_modules()
                 if type(m).__name__ in ("Linear4bit", "Linear8bitLt") and ".lora_" not in n]
    assert all("language_model" in n for n in quantized), "only the LLM may be quantized"
    return model


def peer_worker(spec: dict[str, Any]) -> None:
    """Train the peer as spec says and write its result JSON (see benchlib.runs.run_peer)."""
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
        # group_by_length: transformers' LengthGroupedSampler, lengths read from each sample's
        # input_ids (image slots included), what a Trainer user switches on for LLaVA data
        train_sampling_strategy=spec.get("sampling", "random"),
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

