"""Random-init InternLM2 checkpoints in the hub's layout (llava_tune/demo/random_checkpoint.py),
and the real 1.8B model's shapes: built on the meta device here, run for real (4-bit) in a
slow check."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from llava_tune.assembly.llm import load_llm
from llava_tune.convert.internlm2 import internlm2_to_llama_config
from llava_tune.demo.random_checkpoint import SIZES, internlm2_config, write_checkpoint

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "internlm2-tokenizer"


def test_tiny_random_checkpoint_loads_as_llama(tmp_path, tiny_lm):
    out = write_checkpoint("tiny", tmp_path / "lm", tokenizer=tiny_lm, shard_gb=0.00002)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"tokenizer.model", "tokenizer_config.json", "config.json"} <= {p.name for p in out.iterdir()}
    model, tokenizer = load_llm(out)
    cfg = internlm2_config("tiny")
    expected = LlamaForCausalLM(internlm2_to_llama_config(cfg)).num_parameters()
    assert model.num_parameters() == expected
    assert torch.equal(model.model.norm.weight, torch.ones(cfg["hidden_size"]))
    q = model.model.layers[0].self_attn.q_proj.weight
    assert 0.015 < q.float().std().item() < 0.025  # N(0, 0.02)
    again = write_checkpoint("tiny", tmp_path / "again", tokenizer=tiny_lm)
    assert torch.equal(load_llm(again)[0].model.layers[1].mlp.down_proj.weight,
                       model.model.layers[1].mlp.down_proj.weight)  # seeded


@pytest.mark.parametrize("like, billions", [("internlm2-chat-1_8b", 1.89),
                                            ("internlm2-chat-7b", 7.74)])
def test_real_sizes_on_the_meta_device(like, billions):
    """FACTS.md's parameter counts, from the config the script writes (no memory used)."""
    config = internlm2_to_llama_config(internlm2_config(like))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert model.num_parameters() / 1e9 == pytest.approx(billions, abs=0.01)
    assert SIZES[like]["num_hidden_layers"] == config.num_hidden_layers


def real_size_tokenizer(request: pytest.FixtureRequest) -> Path:
    """InternLM2's real tokenizer (../shared/fixtures, outside the repository) when this
    checkout has it, else the demo's byte-fallback tokenizer of the tiny_lm fixture, as
    scripts/gpu_check.py falls back: the checkpoint's vocabulary stays 92,544 either way, so
    the logits and the memory are the real ones."""
    if (SHARED_TOKENIZER / "tokenizer.model").is_file():
        return SHARED_TOKENIZER
    return request.getfixturevalue("tiny_lm")


def test_real_size_tokenizer_without_the_shared_fixture(request, monkeypatch, tmp_path, tiny_lm):
    """The slow check's tokenizer and load path in a fresh clone (no ../shared), at tiny size."""
    monkeypatch.setitem(globals(), "SHARED_TOKENIZER", tmp_path / "no-shared")
    tokenizer = real_size_tokenizer(request)
    assert tokenizer == tiny_lm
    model, loaded = load_llm(write_checkpoint("tiny", tmp_path / "lm", tokenizer=tokenizer))
    assert model.config.vocab_size == 92544
    assert loaded.convert_tokens_to_ids("<|im_end|>") != loaded.unk_token_id


@pytest.mark.slow
def test_real_size_4bit_forward_backward_on_the_cpu(tmp_path, capsys, request):
    """The 1.8B model at its real size, 4-bit with LoRA, one forward and backward at 128
    tokens: the path a GPU run takes, proven on the CPU (peak RSS reported)."""
    import shutil

    import peft

    from llava_tune.models.llava import LlavaModel

    free_gb = shutil.disk_usage(tmp_path).free / 2**30
    if free_gb < 12:  # the bf16 checkpoint and its Llama-layout copy: ~7.6 GB
        pytest.skip(f"needs ~8 GB of free disk for a real-size checkpoint, {free_gb:.1f} GB free")
    out = write_checkpoint("internlm2-chat-1_8b", tmp_path / "lm",
                           tokenizer=real_size_tokenizer(request))
    model, _ = load_llm(out, quantization="4bit", device="cpu")
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16,
                                                       target_modules="all-linear"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 92000, (1, 128), generator=torch.Generator().manual_seed(0))
    out_sum = LlavaModel(model)(input_ids=ids, labels=ids)
    out_sum.loss_sum.backward()
    assert out_sum.num_tokens.item() == 127
    # Random weights: the loss is about ln(92544) per token.
    assert out_sum.loss_sum.item() / 127 == pytest.approx(11.4, abs=1.0)
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with capsys.disabled():
        print(f"\n[real-size 1.8B, 4-bit + LoRA, 128 tokens: peak RSS {peak_gb:.1f} GB]")
