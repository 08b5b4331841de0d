"""load_llm: InternLM2 as a native Llama (no remote code), 4-bit on the CPU, native dirs, cache."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import llava_tune
from llava_tune.assembly.llm import converted_internlm2_dir, load_tokenizer
from llava_tune.convert.internlm2 import internlm2_to_llama_config, internlm2_to_llama_tensors
from llava_tune.errors import UserError

IDS = torch.tensor([[1, 8, 40, 100, 7, 300, 200, 19, 3], [1, 5, 6, 7, 8, 9, 10, 11, 12]])
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def reference_llama(folder) -> LlamaForCausalLM:
    """A Llama built by hand from the InternLM2 folder's config and tensors."""
    cfg = json.loads((folder / "config.json").read_text())
    model = LlamaForCausalLM(internlm2_to_llama_config(cfg)).float().eval()
    state = {}
    for key, tensor in load_file(folder / "model.safetensors").items():
        state.update(internlm2_to_llama_tensors(key, tensor.float(), cfg))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    return model


@pytest.fixture(scope="module")
def fp32_model(tiny_lm):
    model, tokenizer = llava_tune.load_llm(tiny_lm)
    return model.eval(), tokenizer


def test_internlm2_loads_as_native_llama(tiny_lm, fp32_model):
    model, tokenizer = fp32_model
    assert type(model) is LlamaForCausalLM
    assert type(model).__module__ == "transformers.models.llama.modeling_llama"
    assert model.config.model_type == "llama"
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    source = json.loads((tiny_lm / "config.json").read_text())
    assert source["model_type"] == "internlm2" and "auto_map" in source
    assert model.config.num_key_value_heads == source["num_key_value_heads"] == 2
    assert model.config.vocab_size == source["vocab_size"] == len(tokenizer)
    # The tokenizer comes from the InternLM2 folder, with the chat tokens.
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 7
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 8
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id == 1


def test_logits_equal_hand_converted_llama(tiny_lm, fp32_model):
    model, _ = fp32_model
    reference = reference_llama(tiny_lm)
    with torch.no_grad():
        got = model(IDS).logits
        want = reference(IDS).logits
    assert got.shape == (2, IDS.shape[1], 512)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert got.std() > 1e-3  # not a degenerate all-zero model


def test_dtype_argument(tiny_lm):
    model, _ = llava_tune.load_llm(tiny_lm, dtype="bf16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype 'float8'"):
        llava_tune.load_llm(tiny_lm, dtype="float8")


def test_4bit_on_cpu(tiny_lm, fp32_model):
    import bitsandbytes as bnb

    model, _ = llava_tune.load_llm(tiny_lm, quantization="4bit")
    quant = model.config.quantization_config
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4"
    assert quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.float32
    for layer in model.model.layers:
        for name in LINEAR_NAMES:
            module = getattr(layer.self_attn if name[0] in "qkvo" else layer.mlp, name)
            assert isinstance(module, bnb.nn.Linear4bit), name
            assert module.weight.quant_type == "nf4"
            assert module.weight.dtype == torch.uint8
            assert module.compute_dtype == torch.float32
            assert module.weight.device.type == "cpu"
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # the head stays full precision
    with torch.no_grad():
        got = model(IDS).logits.float()
        want = fp32_model[0](IDS).logits
    assert got.shape == want.shape and torch.isfinite(got).all()
    corr = torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1]
    assert corr > 0.95
    assert not torch.equal(got, want)  # really quantized


def test_unknown_quantization(tiny_lm):
    with pytest.raises(UserError, match="unknown quantization '2bit'"):
        llava_tune.load_llm(tiny_lm, quantization="2bit")


def test_native_llama_dir_loads_as_is(tmp_path, tiny_lm, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAVA_TUNE_CACHE", str(cache))
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    original = LlamaForCausalLM(config).eval()
    folder = tmp_path / "native-llama"
    original.save_pretrained(folder)
    load_tokenizer(tiny_lm).save_pretrained(folder)
    assert (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").exists()

    model, tokenizer = llava_tune.load_llm(folder)
    assert type(model) is LlamaForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, original(IDS).logits, atol=0, rtol=0)
    assert not cache.exists()  # nothing converted
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 7
    assert tokenizer("hi")["input_ids"] == load_tokenizer(tiny_lm)("hi")["input_ids"]


def test_missing_dir(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError, match=f"LLM directory {missing} not found"):
        llava_tune.load_llm(missing)


def test_dir_without_config(tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=f"{folder} has no config.json"):
        llava_tune.load_llm(folder)


def test_conversion_cache_is_reused(tmp_path, tiny_lm, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAVA_TUNE_CACHE", str(cache))
    source = tmp_path / "tiny-internlm2"
    shutil.copytree(tiny_lm, source)

    llava_tune.load_llm(source)
    (converted,) = (cache / "internlm2-as-llama").iterdir()
    assert converted.name.startswith("tiny-internlm2-")
    assert converted == converted_internlm2_dir(source)
    assert json.loads((converted / "config.json").read_text())["model_type"] == "llama"
    stamps = {f.name: f.stat().st_mtime_ns for f in converted.iterdir()}
    assert "model.safetensors" in stamps

    llava_tune.load_llm(source)
    assert list((cache / "internlm2-as-llama").iterdir()) == [converted]
    assert {f.name: f.stat().st_mtime_ns for f in converted.iterdir()} == stamps

    # Changed weights are converted again, into a new folder.
    weights = source / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = converted_internlm2_dir(source)
    assert again != converted and (again / "model.safetensors").is_file()
    assert sorted((cache / "internlm2-as-llama").iterdir()) == sorted([converted, again])
