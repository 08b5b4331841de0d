"""The training loop end to end on the tiny fixtures: loss goes down, the run dir holds what the
later stages need, a finished run loads back with the same logits, checkpoints resume."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from helpers import LOGGED, tiny_model
from safetensors.torch import load_file

import llava_tune
from llava_tune.config import load_config
from llava_tune.data.collate import Batch, Collator
from llava_tune.rundir import read_run_config
from llava_tune.training import events as ev
from llava_tune.training import train
from llava_tune.training.loop import fit
from llava_tune.training.setup import build_dataset, build_for_training, setup

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"


def overrides(stage_file, tiny_lm, tiny_vision, data_file, image_folder, run_dir, *extra):
    return [*tiny_model(tiny_lm, tiny_vision), f"data.train={data_file}",
            f"data.image_folder={image_folder}", f"run_dir={run_dir}", *LOGGED, *extra]


def subset(source: Path, out: Path, n: int, repeat: int = 1) -> Path:
    """The first n records of a data file, repeated."""
    records = json.loads(source.read_text())[:n]
    out.write_text(json.dumps([dict(r, id=f"{r['id']}-{k}") for k in range(repeat) for r in records]))
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Trained:
    """A finished run plus the in-memory model it ended with and its projector at the start."""

    def __init__(self, result, model, initial_projector, events):
        self.result = result
        self.run_dir = result.run_dir
        self.model = model
        self.initial_projector = initial_projector
        self.events = events


def train_capturing(config) -> Trained:
    """setup + fit, keeping the trained model and the projector weights it started from."""
    run = setup(config)
    projector = run.bundle.model.projector
    initial = ({k: v.clone() for k, v in projector.state_dict().items()}
               if projector is not None else None)
    events = []
    try:
        result = fit(run, events.append)
    finally:
        run.close()
    return Trained(result, run.accelerator.unwrap_model(run.model), initial, events)


@pytest.fixture(scope="module")
def files(tmp_path_factory, shapes_data, tiny_lm, tiny_vision):
    root = tmp_path_factory.mktemp("train")
    images = shapes_data / "images"

    def make(stage_file, data_file, run, *extra):
        return load_config(DEMO / f"{stage_file}.yaml",
                           overrides(stage_file, tiny_lm, tiny_vision, data_file, images,
                                     root / run, *extra))

    return root, make


@pytest.fixture(scope="module")
def pretrain_run(files, shapes_data) -> Trained:
    root, make = files
    # Four captions: every step sees the same batch, so the loss can only fall by learning.
    data = subset(shapes_data / "pretrain.json", root / "pretrain4.json", 4)
    return train_capturing(make("pretrain", data, "pretrain", "train.max_steps=6",
                                "train.lr=1e-2"))


@pytest.fixture(scope="module")
def finetune_run(files, shapes_data, pretrain_run) -> Trained:
    root, make = files
    data = subset(shapes_data / "finetune.json", root / "finetune4.json", 4)
    return train_capturing(make("finetune", data, "finetune", "train.max_steps=4",
                                "train.lr=1e-2", f"init_from={pretrain_run.run_dir}"))


@pytest.fixture(scope="module")
def sft_run(files, shapes_data) -> Trained:
    root, make = files
    data = subset(shapes_data / "text.json", root / "text4.json", 4)
    return train_capturing(make("lm", data, "sft", "train.max_steps=4", "train.lr=3e-3"))


def a_batch(bundle, data_file: str) -> Batch:
    """The first four samples of the run's data file, collated, as the trainer sees them."""
    config = bundle.config
    dataset = build_dataset(load_config(None, [
        f"model.llm={config.model.llm}", f"data.train={data_file}",
        f"data.image_folder={config.data.image_folder}", f"run_dir={config.run_dir}",
        f"data.max_length={config.data.max_length}"]), bundle, data_file)
    return Collator(bundle.tokenizer.pad_token_id)([dataset[i] for i in range(4)])


@torch.no_grad()
def logits(model, batch: Batch) -> torch.Tensor:
    model.eval()
    return model.logits(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask)


# --------------------------------------------------------------------------- loss


def test_pretrain_lowers_the_loss(pretrain_run):
    rows = metrics(pretrain_run.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    losses = [r["loss"] for r in rows]
    assert all(loss == loss and loss > 0 for loss in losses)  # finite, positive
    assert losses[-1] < losses[0] - 0.1, losses
    assert pretrain_run.result.steps == 6
    assert pretrain_run.result.final_loss == pytest.approx(losses[-1], abs=1e-5)
    assert {"lr", "tokens_per_s", "memory_mb", "epoch"} <= set(rows[0])


def test_sft_full_lowers_the_loss(sft_run):
    losses = [r["loss"] for r in metrics(sft_run.run_dir)]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.1, losses


# --------------------------------------------------------------------------- run dir layout


def test_pretrain_run_dir_layout(pretrain_run):
    run = pretrain_run.run_dir
    assert sorted(p.name for p in run.iterdir()) == [
        "COMPLETE", "config.yaml", "loss.png", "metrics.jsonl", "projector"]
    assert json.loads((run / "COMPLETE").read_text())["parts"] == ["projector"]
    assert sorted(p.name for p in (run / "projector").iterdir()) == ["config.json", "model.safetensors"]
    assert set(load_file(run / "projector" / "model.safetensors")) == {
        "model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"}
    assert json.loads((run / "projector" / "config.json").read_text()) == {
        "vision_hidden_size": 64, "llm_hidden_size": 64, "depth": 2}
    # The recorded config is resolved: absolute paths, the stage, what was overridden.
    config = read_run_config(run)
    assert config.stage == "pretrain" and config.train.max_steps == 6
    assert Path(config.model.llm).is_absolute() and Path(config.run_dir) == run


def test_finetune_run_dir_layout(finetune_run):
    run = finetune_run.run_dir
    assert sorted(p.name for p in run.iterdir()) == [
        "COMPLETE", "config.yaml", "llm_adapter", "loss.png", "metrics.jsonl", "projector"]
    adapter = run / "llm_adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    keys = set(load_file(adapter / "adapter_model.safetensors"))
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), sorted(keys)[:5]
    assert len(keys) == 2 * 2 * 7  # 2 layers x 7 linears x (A, B)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["r"] == 16 and adapter_config["lora_alpha"] == 32
    # "all-linear": every linear of every layer, the LM head not among them.
    targets = set(adapter_config["target_modules"])
    assert len(targets) == 2 * 7 and not any("lm_head" in t for t in targets)
    assert {t.rsplit(".", 1)[-1] for t in targets} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_sft_full_run_dir_layout(sft_run):
    run = sft_run.run_dir
    assert sorted(p.name for p in run.iterdir()) == [
        "COMPLETE", "config.yaml", "llm", "loss.png", "metrics.jsonl"]
    names = {p.name for p in (run / "llm").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names


# --------------------------------------------------------------------------- init_from, round trip


def test_finetune_starts_from_the_pretrained_projector(finetune_run, pretrain_run):
    saved = load_file(pretrain_run.run_dir / "projector" / "model.safetensors")
    for key, value in finetune_run.initial_projector.items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    # and went on training it
    final = load_file(finetune_run.run_dir / "projector" / "model.safetensors")
    assert not torch.equal(final["model.0.weight"], saved["model.0.weight"])


def test_init_from_a_lora_run_keeps_training_its_adapter(files, finetune_run):
    """A third stage started from a finetune run: the adapter loads trainable, nothing new."""
    _, make = files
    config = make("finetune", "unused.json", "again", f"init_from={finetune_run.run_dir}")
    bundle, carried = build_for_training(config, device="cpu")
    assert carried == ["projector", "llm_adapter"]
    names = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    lora = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    assert names - lora == {"projector.model.0.weight", "projector.model.0.bias",
                            "projector.model.2.weight", "projector.model.2.bias"}
    assert len(lora) == 2 * 2 * 7
    saved = load_file(finetune_run.run_dir / "llm_adapter" / "adapter_model.safetensors")
    params = dict(bundle.model.llm.named_parameters())
    for key, value in saved.items():
        name = key.replace(".weight", ".default.weight")
        torch.testing.assert_close(params[name], value, rtol=0, atol=0)


def test_pretrain_round_trip(pretrain_run, shapes_data):
    bundle = llava_tune.load_run(pretrain_run.run_dir)
    assert not any(p.requires_grad for p in bundle.model.parameters())
    batch = a_batch(bundle, bundle.config.data.train)
    assert batch.pixel_values.shape == (4, 3, 32, 32)
    expected = logits(pretrain_run.model, batch)
    torch.testing.assert_close(logits(bundle.model, batch), expected, rtol=1e-5, atol=1e-5)
    # The projector was really trained and really loaded: not the initial weights.
    for key, value in bundle.model.projector.state_dict().items():
        assert not torch.allclose(value, pretrain_run.initial_projector[key]), key
    bundle.model.projector.load_state_dict(pretrain_run.initial_projector)
    assert not torch.allclose(logits(bundle.model, batch), expected, atol=1e-3)


def test_finetune_round_trip(finetune_run):
    bundle = llava_tune.load_run(finetune_run.run_dir)
    assert isinstance(bundle.model.llm, peft.PeftModel)
    assert bundle.config.model.quantization == "4bit"
    batch = a_batch(bundle, bundle.config.data.train)
    expected = logits(finetune_run.model, batch)
    got = logits(bundle.model, batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # The adapter was trained (LoRA B starts at zero) and is in use.
    lora_b = [p for n, p in bundle.model.llm.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)
    with bundle.model.llm.disable_adapter():
        without = logits(bundle.model, batch)
    assert not torch.allclose(without, expected, atol=1e-3)


def test_sft_full_round_trip(sft_run, tiny_lm):
    bundle = llava_tune.load_run(sft_run.run_dir)
    assert bundle.model.vision is None
    batch = a_batch(bundle, bundle.config.data.train)
    expected = logits(sft_run.model, batch)
    torch.testing.assert_close(logits(bundle.model, batch), expected, rtol=1e-5, atol=1e-5)
    base, _ = llava_tune.load_llm(tiny_lm, device="cpu")
    with torch.no_grad():
        before = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not torch.allclose(before, expected, atol=1e-3)


# --------------------------------------------------------------------------- checkpoints


class Crash(Exception):
    pass


def test_resume_from_checkpoint_matches_an_uninterrupted_run(files, shapes_data):
    root, make = files
    # 12 samples at batch 4: three batches per epoch, so step 4 resumes inside epoch 1.
    data = subset(shapes_data / "pretrain.json", root / "pretrain12.json", 12)
    extra = ("train.max_steps=6", "train.save_every=2", "train.lr=1e-2")

    straight = train(make("pretrain", data, "straight", *extra))

    def crash_at_step_5(event):
        if isinstance(event, ev.Logged) and event.step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(make("pretrain", data, "resumed", *extra), on_event=crash_at_step_5)
    run = root / "resumed"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-0000002", "step-0000004"]
    checkpoint = run / "checkpoints" / "step-0000004"
    assert {"trainable.safetensors", "optimizer.pt", "state.json"} <= {
        p.name for p in checkpoint.iterdir()}
    assert json.loads((checkpoint / "state.json").read_text()) == {
        "step": 4, "epoch": 1, "batch_in_epoch": 1}
    assert set(load_file(checkpoint / "trainable.safetensors")) == {
        "projector.model.0.weight", "projector.model.0.bias",
        "projector.model.2.weight", "projector.model.2.bias"}
    assert not (run / "projector").exists() and not (run / "COMPLETE").exists()
    assert not (run / ".lock").exists()  # released when the crash ended the run

    events = []
    resumed = train(make("pretrain", data, "resumed", *extra, "train.resume=true"),
                    on_event=events.append)
    assert isinstance(events[0], ev.Started) and events[0].step == 4
    assert [e.step for e in events if isinstance(e, ev.Logged)] == [5, 6]
    assert resumed.steps == 6
    # save_total_limit=2 keeps the newest two
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-0000004", "step-0000006"]
    steps = [r["step"] for r in metrics(run)]
    assert steps == [1, 2, 3, 4, 5, 6]
    straight_losses = [r["loss"] for r in metrics(straight.run_dir)]
    assert [r["loss"] for r in metrics(run)] == pytest.approx(straight_losses, abs=1e-4)

    a = load_file(straight.run_dir / "projector" / "model.safetensors")
    b = load_file(run / "projector" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage_file", ["pretrain", "finetune"])
def test_a_micro_batch_without_images_trains(stage_file, stage_overrides, shapes_data, tmp_path):
    """Text-only records among image ones (LLaVA-665K has a third of them): a micro-batch of
    text alone still has a loss to backpropagate in pretrain, where only the projector trains
    and no image reached it (4 samples, 4 steps of 1: two steps see text alone)."""
    images = json.loads((shapes_data / "pretrain.json").read_text())[:2]
    text = json.loads((shapes_data / "text.json").read_text())[:2]
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps([text[0], images[0], text[1], images[1]]))
    config = load_config(DEMO / f"{stage_file}.yaml", [
        *stage_overrides(stage_file), f"data.train={data}", "init_from=null",
        "train.batch_size=1", "train.max_steps=4", "train.lr=1e-2", "train.warmup_ratio=0",
        "data.group_by_length=false"])
    seen: list[float] = []
    result = train(config, on_event=lambda e: seen.append(e.loss)
                   if isinstance(e, ev.Logged) else None)
    assert result.steps == 4 and len(seen) == 4 and all(torch.isfinite(torch.tensor(seen)))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_a_training_step_never_reads_a_tensor_on_the_host(files, shapes_data, monkeypatch,
                                                          layout):
    """No .item(), .tolist(), float() or bool() of a tensor by llava-tune inside an optimizer
    step (on a GPU each one waits for the device): the loss and its stats are summed on the
    device and read at the log line only; the image slots are counted when the batch is made.
    QLoRA finetune, two micro-batches a step.

    One read in a library is left: torch.optim's step counters (CPU tensors on a GPU too: no
    wait). transformers builds no mask (whose building reads the device once per forward:
    whether a batch has padding, whether its rows are packed): training attends without one
    (models/attention.py)."""
    from llava_tune.training import loop

    root, make = files
    data = subset(shapes_data / "finetune.json", root / "finetune8.json", 8)
    config = make("finetune", data, f"no-sync-{layout}", "train.max_steps=4",
                  "train.log_every=4", "train.grad_accum=2", "train.batch_size=2",
                  "init_from=null", f"data.pack={layout == 'packed'}")
    reads: list[str] = []
    inside = [False]
    step = loop._step

    def watched(*args, **kwargs):
        inside[0] = True
        try:
            return step(*args, **kwargs)
        finally:
            inside[0] = False

    def recorder(name, original):
        def read(self, *args, **kwargs):
            if inside[0]:
                import traceback

                where = [line.strip().splitlines()[0]
                         for line in traceback.format_stack(limit=6)[:-1]]
                reads.append(f"{name}: {' <- '.join(reversed(where))}")
            return original(self, *args, **kwargs)
        return read

    monkeypatch.setattr(loop, "_step", watched)
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, recorder(name, getattr(torch.Tensor, name)))
    trained = train_capturing(config)
    assert trained.result.steps == 4
    library = ("torch/optim/",)
    reads = [r for r in reads if not any(part in r.split(" <- ")[0] for part in library)]
    assert reads == [], "\n".join(f"{n} x {r}" for r, n in __import__("collections").Counter(reads).most_common())
    assert len(metrics(trained.run_dir)) == 1
