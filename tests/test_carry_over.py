"""Nothing trained is dropped without a word: init_from carries every part of the earlier run
(or refuses, naming it), checkpoints must match the model exactly, and the validation loss is
the model's token-weighted loss on data.eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import llava_tune
from llava_tune.config import load_config
from llava_tune.data.collate import Collator
from llava_tune.errors import UserError
from llava_tune.rundir import read_run_config
from llava_tune.training import train
from llava_tune.training.setup import build_dataset, build_for_training

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
QUICK = ["train.log_every=1", "train.warmup_ratio=0", "data.max_length=64", "train.batch_size=4"]
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])


def text_config(tiny_lm, shapes_data, run_dir, *extra):
    return load_config(DEMO / "lm.yaml", [f"model.llm={tiny_lm}", f"run_dir={run_dir}",
                                          f"data.train={shapes_data / 'text.json'}", *QUICK,
                                          *extra])


@torch.no_grad()
def llm_logits(llm) -> torch.Tensor:
    return llm(input_ids=IDS).logits


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_lm, shapes_data) -> Path:
    """The whole tiny LLM trained (llm/)."""
    run = tmp_path_factory.mktemp("carry") / "full"
    train(text_config(tiny_lm, shapes_data, run, "train.max_steps=3", "train.lr=1e-2"))
    return run


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_lm, shapes_data) -> Path:
    run = tmp_path_factory.mktemp("carry") / "lora"
    train(text_config(tiny_lm, shapes_data, run, "train.llm=lora", "train.max_steps=3",
                      "train.lr=1e-2", "train.lora.r=8", "train.lora.alpha=16"))
    return run


def test_lora_on_a_fully_trained_llm_keeps_its_weights(tmp_path, full_run, tiny_lm, shapes_data):
    config = text_config(tiny_lm, shapes_data, tmp_path / "next", "train.llm=lora",
                         "train.max_steps=2", f"init_from={full_run}")
    result = train(config)
    recorded = read_run_config(result.run_dir)
    # The base of the new run is the earlier run's trained LLM, not the original one.
    assert Path(recorded.model.llm) == (full_run / "llm").resolve()
    trained_base, _ = llava_tune.load_llm(full_run / "llm", device="cpu")
    original, _ = llava_tune.load_llm(tiny_lm, device="cpu")
    loaded = llava_tune.load_run(result.run_dir)
    with loaded.model.llm.disable_adapter():
        torch.testing.assert_close(llm_logits(loaded.model.llm), llm_logits(trained_base))
    assert not torch.allclose(llm_logits(trained_base), llm_logits(original), atol=1e-3)


def test_full_training_after_lora_merges_the_adapter(tmp_path, lora_run, tiny_lm, shapes_data):
    config = text_config(tiny_lm, shapes_data, tmp_path / "next", "train.llm=full",
                         "train.max_steps=1", f"init_from={lora_run}")
    bundle, carried = build_for_training(config, device="cpu")
    assert carried == ["llm_adapter"]
    # Before any step the model is the LoRA run's function, as plain weights that all train.
    before = llava_tune.load_run(lora_run)
    torch.testing.assert_close(llm_logits(bundle.model.llm), llm_logits(before.model.llm),
                               atol=1e-5, rtol=0)
    assert all(p.requires_grad for p in bundle.model.llm.parameters())
    result = train(config)
    parts = json.loads((result.run_dir / "COMPLETE").read_text())["parts"]
    assert parts == ["llm"]  # the whole trained LLM, nothing left in an adapter


def test_continued_lora_must_keep_its_rank(tmp_path, lora_run, tiny_lm, shapes_data):
    config = text_config(tiny_lm, shapes_data, tmp_path / "next", "train.llm=lora",
                         f"init_from={lora_run}", "train.lora.r=16")
    with pytest.raises(UserError, match=r"r=8.*train.lora.r=16.*set train.lora.r=8"):
        build_for_training(config, device="cpu")


def test_a_projector_has_no_place_in_a_text_stage(tmp_path, stage_overrides, tiny_lm,
                                                  shapes_data):
    pretrain = tmp_path / "pretrain"
    train(load_config(DEMO / "pretrain.yaml", [*stage_overrides("pretrain", "pretrain"),
                                               "train.max_steps=1", *QUICK]))
    config = text_config(tiny_lm, shapes_data, tmp_path / "next", "train.llm=lora",
                         f"init_from={pretrain}")
    with pytest.raises(UserError, match="trained a projector, which stage sft has no place for"):
        build_for_training(config, device="cpu")


def test_init_from_an_unfinished_run_is_refused(tmp_path, lora_run, tiny_lm, shapes_data):
    (lora_run / "COMPLETE").rename(lora_run / "COMPLETE.bak")
    try:
        config = text_config(tiny_lm, shapes_data, tmp_path / "next", f"init_from={lora_run}")
        with pytest.raises(UserError, match="holds no finished run"):
            build_for_training(config, device="cpu")
    finally:
        (lora_run / "COMPLETE.bak").rename(lora_run / "COMPLETE")


def test_checkpoint_must_hold_exactly_the_trainable_weights(tmp_path, tiny_lm, shapes_data):
    run = tmp_path / "run"
    config = text_config(tiny_lm, shapes_data, run, "train.llm=lora", "train.max_steps=2",
                         "train.save_every=1")
    train(config)
    checkpoint = run / "checkpoints" / "step-0000002"
    weights = load_file(checkpoint / "trainable.safetensors")
    dropped = dict(list(weights.items())[1:])
    save_file(dropped, checkpoint / "trainable.safetensors")
    resumed = text_config(tiny_lm, shapes_data, run, "train.llm=lora", "train.max_steps=3",
                          "train.save_every=1", "train.resume=true")
    with pytest.raises(UserError, match="1 trainable weights missing"):
        train(resumed)
    save_file({**weights, "llm.extra.weight": torch.zeros(1)},
              checkpoint / "trainable.safetensors")
    with pytest.raises(UserError, match="1 unexpected"):
        train(resumed)


def test_validation_loss_is_the_token_weighted_loss_on_data_eval(tmp_path, tiny_lm,
                                                                 shapes_data):
    records = json.loads((shapes_data / "text.json").read_text())[:10]
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps(records))
    config = text_config(tiny_lm, shapes_data, tmp_path / "run", "train.max_steps=4",
                         "train.eval_every=2", f"data.eval={eval_file}", "train.lr=1e-2")
    events = []
    train(config, on_event=events.append)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval_loss" in line]
    assert [line["step"] for line in evals] == [2, 4]
    assert [e.eval_loss for e in events if type(e).__name__ == "Evaluated"] == \
        [line["eval_loss"] for line in evals]
    # Independently: the finished model's plain logits and cross-entropy over every eval token.
    bundle = llava_tune.load_run(tmp_path / "run")
    dataset = build_dataset(bundle.config, bundle, str(eval_file))
    batch = Collator(bundle.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = bundle.model.llm(input_ids=batch.input_ids,
                                  attention_mask=batch.attention_mask).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten())
    assert evals[-1]["eval_loss"] == pytest.approx(expected.item(), abs=1e-4)
