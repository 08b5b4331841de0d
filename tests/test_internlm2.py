"""InternLM2 <-> Llama conversion, checked against an InternLM2 forward written from the architecture.

The reference below deliberately shares no code with llava_tune.convert.internlm2: it reads the
packed wqkv the way InternLM2's own modeling code does, so a wrong split shows up as wrong logits.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from llava_tune.convert.internlm2 import (
    convert_internlm2_dir,
    internlm2_to_llama_config,
    internlm2_to_llama_tensors,
    is_internlm2_dir,
    iter_checkpoint_shards,
    llama_to_internlm2_config,
    llama_to_internlm2_state_dict,
    save_internlm2_checkpoint,
)
from llava_tune.errors import UserError

# config.json of internlm2-chat-7b as published (minus transformers_version).
PUBLISHED_7B = {
    "architectures": ["InternLM2ForCausalLM"],
    "attn_implementation": "eager",
    "auto_map": {
        "AutoConfig": "configuration_internlm2.InternLM2Config",
        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    },
    "bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "internlm2",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pad_token_id": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 92544,
}


def tiny_config(heads: int = 4, kv_heads: int = 2, bias: bool = False, **overrides) -> dict:
    cfg = dict(PUBLISHED_7B)
    cfg.update(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        rope_theta=10000,
        rope_scaling=None,
        bias=bias,
        torch_dtype="float32",
    )
    cfg.update(overrides)
    return cfg


def random_internlm2_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the published InternLM2 key layout (norm weights away from 1 on purpose)."""
    gen = torch.Generator().manual_seed(seed)
    c, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = c // cfg["num_attention_heads"]
    qkv_rows = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * d

    def rand(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    sd = {"model.tok_embeddings.weight": rand(vocab, c, scale=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "attention.wqkv.weight"] = rand(qkv_rows, c)
        sd[p + "attention.wo.weight"] = rand(c, c)
        if cfg["bias"]:
            sd[p + "attention.wqkv.bias"] = rand(qkv_rows)
            sd[p + "attention.wo.bias"] = rand(c)
        sd[p + "feed_forward.w1.weight"] = rand(inter, c)
        sd[p + "feed_forward.w3.weight"] = rand(inter, c)
        sd[p + "feed_forward.w2.weight"] = rand(c, inter)
        sd[p + "attention_norm.weight"] = 1 + rand(c)
        sd[p + "ffn_norm.weight"] = 1 + rand(c)
    sd["model.norm.weight"] = 1 + rand(c)
    sd["output.weight"] = rand(vocab, c)
    return sd


# --------------------------------------------------------------------------- reference forward


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def apply_rotary(x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """x [B, heads, T, D] rotated by position 0..T-1 (rotate_half convention, InternLM2 scalings)."""
    t, d = x.shape[-2], x.shape[-1]
    base, positions = float(cfg["rope_theta"]), torch.arange(t, dtype=torch.float32)
    scaling, max_pos = cfg["rope_scaling"], cfg["max_position_embeddings"]
    if scaling and scaling["type"] == "linear":
        positions = positions / scaling["factor"]
    if scaling and scaling["type"] == "dynamic" and t > max_pos:
        factor = scaling["factor"]
        base = base * ((factor * t / max_pos) - (factor - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.outer(positions, inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * emb.cos() + rotated * emb.sin()


def reference_internlm2_logits(sd: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """ids [B, T] -> logits [B, T, vocab], InternLM2's forward written out by hand."""
    b, t = ids.shape
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    g, d, eps = h // kv, cfg["hidden_size"] // h, cfg["rms_norm_eps"]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = sd["model.tok_embeddings.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = rms_norm(x, sd[p + "attention_norm.weight"], eps)
        qkv = F.linear(y, sd[p + "attention.wqkv.weight"], sd.get(p + "attention.wqkv.bias"))
        qkv = qkv.view(b, t, kv, g + 2, d)  # per kv head: g queries, 1 key, 1 value
        q = qkv[:, :, :, :g].reshape(b, t, h, d).transpose(1, 2)
        k = qkv[:, :, :, g].transpose(1, 2)
        v = qkv[:, :, :, g + 1].transpose(1, 2)
        q, k = apply_rotary(q, cfg), apply_rotary(k, cfg)
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = (probs @ v).transpose(1, 2).reshape(b, t, h * d)
        x = x + F.linear(attn, sd[p + "attention.wo.weight"], sd.get(p + "attention.wo.bias"))
        y = rms_norm(x, sd[p + "ffn_norm.weight"], eps)
        gate = F.silu(F.linear(y, sd[p + "feed_forward.w1.weight"]))
        up = F.linear(y, sd[p + "feed_forward.w3.weight"])
        x = x + F.linear(gate * up, sd[p + "feed_forward.w2.weight"])
    x = rms_norm(x, sd["model.norm.weight"], eps)
    return F.linear(x, sd["output.weight"])


# --------------------------------------------------------------------------- helpers


def write_internlm2_dir(path: Path, cfg: dict, sd: dict, shards: int = 1, fmt: str = "safetensors"):
    """An InternLM2 checkpoint folder: config.json + weights, optionally sharded with an index."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    keys = list(sd)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")

    def write(tensors: dict, file: Path) -> None:
        if fmt == "safetensors":
            save_file(tensors, file, metadata={"format": "pt"})
        else:
            torch.save(tensors, file)

    if shards == 1:
        write(sd, path / f"{stem}.{ext}")
        return
    weight_map = {}
    for n in range(shards):
        name = f"{stem}-{n + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: sd[k] for k in keys[n::shards]}
        write(part, path / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / f"{stem}.{ext}.index.json").write_text(json.dumps(index))


def load_llama(path: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_ids(cfg: dict, t: int = 12, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["vocab_size"], (2, t), generator=gen)


def llama_logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "cfg",
    [
        tiny_config(heads=4, kv_heads=2),
        tiny_config(heads=4, kv_heads=4, bias=True),
        # positions past max_position_embeddings, so the dynamic NTK base really changes
        tiny_config(
            heads=4,
            kv_heads=1,
            max_position_embeddings=8,
            rope_scaling={"type": "dynamic", "factor": 2.0},
            rope_theta=1000000,
        ),
        tiny_config(heads=4, kv_heads=2, bias=True, rope_scaling={"type": "linear", "factor": 2.0}),
    ],
    ids=["gqa", "mha-bias", "mqa-dynamic-rope", "gqa-bias-linear-rope"],
)
def test_converted_checkpoint_matches_reference_forward(tmp_path, cfg):
    torch.manual_seed(0)
    sd = random_internlm2_weights(cfg)
    src = tmp_path / "internlm2"
    write_internlm2_dir(src, cfg, sd)
    assert is_internlm2_dir(src)

    dst = convert_internlm2_dir(src, tmp_path / "llama")
    assert not is_internlm2_dir(dst)
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "temp folder left behind"

    ids = random_ids(cfg)
    expected = reference_internlm2_logits(sd, cfg, ids)
    got = llama_logits(load_llama(dst), ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_convert_keeps_a_complete_destination_untouched(tmp_path):
    cfg = tiny_config()
    write_internlm2_dir(tmp_path / "src", cfg, random_internlm2_weights(cfg))
    dst = convert_internlm2_dir(tmp_path / "src", tmp_path / "dst")
    before = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}
    (tmp_path / "src" / "model.safetensors").unlink()  # would fail if it were read again
    assert convert_internlm2_dir(tmp_path / "src", tmp_path / "dst") == dst
    assert {p.name: p.stat().st_mtime_ns for p in dst.iterdir()} == before


def test_conversions_of_one_checkpoint_at_once_take_turns(tmp_path):
    """The ranks of a launch convert the same checkpoint into the same cache folder at once
    (two of them crashed on a cold cache): the second waits for the first's lock, then
    returns the finished folder without converting again."""
    import threading

    from llava_tune.files import exclusive

    cfg = tiny_config()
    write_internlm2_dir(tmp_path / "src", cfg, random_internlm2_weights(cfg))
    dst = tmp_path / "cache" / "llama"
    results = []
    waiting = threading.Thread(target=lambda: results.append(
        convert_internlm2_dir(tmp_path / "src", dst)))
    with exclusive(dst):  # another process converting
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and not dst.exists()  # it waits instead of converting too
        convert_internlm2_dir(tmp_path / "src", dst.parent / "other")
        (dst.parent / "other").rename(dst)  # what the holder of the lock writes
    waiting.join(timeout=60)
    assert results == [dst] and not waiting.is_alive()
    # It returned the folder the lock holder finished.
    assert {p.name for p in dst.iterdir()} == {"config.json", "model.safetensors"}
    threads = [threading.Thread(target=lambda: results.append(
        convert_internlm2_dir(tmp_path / "src", tmp_path / "fresh"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results[1:] == [tmp_path / "fresh"] * 3


def test_convert_rejects_a_folder_that_is_not_internlm2(tmp_path):
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="not an InternLM2 checkpoint"):
        convert_internlm2_dir(src, tmp_path / "out")
    assert not is_internlm2_dir(tmp_path / "nothing-here")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_checkpoints_load_and_convert_like_a_single_file(tmp_path, fmt):
    cfg = tiny_config(bias=True)
    sd = random_internlm2_weights(cfg)
    write_internlm2_dir(tmp_path / "single", cfg, sd)
    write_internlm2_dir(tmp_path / "sharded", cfg, sd, shards=2, fmt=fmt)

    shards = list(iter_checkpoint_shards(tmp_path / "sharded"))
    assert [name for name, _ in shards] == [
        f"{'model' if fmt == 'safetensors' else 'pytorch_model'}-0000{n}-of-00002.{fmt}"
        for n in (1, 2)
    ]
    merged = {k: v for _, part in shards for k, v in part.items()}
    assert merged.keys() == sd.keys()
    for key in sd:
        assert torch.equal(merged[key], sd[key]), key

    dst = convert_internlm2_dir(tmp_path / "sharded", tmp_path / "converted")
    assert sorted(os.listdir(dst)) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    on_disk = {k for n in (1, 2) for k in load_file(dst / f"model-0000{n}-of-00002.safetensors")}
    assert set(index["weight_map"]) == on_disk
    ids = random_ids(cfg)
    single = llama_logits(
        load_llama(convert_internlm2_dir(tmp_path / "single", tmp_path / "c1")), ids
    )
    torch.testing.assert_close(llama_logits(load_llama(dst), ids), single, atol=0, rtol=0)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_missing_shard_names_the_file(tmp_path, fmt):
    cfg = tiny_config()
    src = tmp_path / "src"
    write_internlm2_dir(src, cfg, random_internlm2_weights(cfg), shards=2, fmt=fmt)
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    (src / f"{stem}-00002-of-00002.{fmt}").unlink()
    with pytest.raises(UserError, match=f"{stem}-00002-of-00002.{fmt} listed in .*missing"):
        list(iter_checkpoint_shards(src))
    with pytest.raises(UserError, match="re-download"):
        convert_internlm2_dir(src, tmp_path / "dst")
    assert os.listdir(tmp_path) == ["src"], "a failed conversion must leave nothing behind"


def test_missing_weights_names_the_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(UserError, match=rf"(?s)no model weights in {src}.*model\.safetensors"):
        list(iter_checkpoint_shards(src))


def test_llama_round_trip_through_internlm2_layout(tmp_path):
    cfg = internlm2_to_llama_config(tiny_config(bias=True, rope_theta=1000000))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():  # biases start at 0 and norms at 1; make them matter
            param.copy_(torch.randn_like(param) * 0.1 + (1 if param.ndim == 1 else 0))
    sd = model.state_dict()

    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("replaced")  # an existing folder is replaced as a whole
    save_internlm2_checkpoint(sd, cfg, out)
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert is_internlm2_dir(out)
    saved = load_file(out / "model.safetensors")
    assert "model.layers.1.attention.wqkv.bias" in saved and "output.weight" in saved
    assert not [k for k in saved if "proj" in k]

    back = load_llama(convert_internlm2_dir(out, tmp_path / "back"))
    back_sd = back.state_dict()
    assert back_sd.keys() == sd.keys()
    for key in sd:
        assert torch.equal(back_sd[key], sd[key]), key
    ids = random_ids(tiny_config())
    torch.testing.assert_close(llama_logits(back, ids), llama_logits(model, ids), atol=0, rtol=0)


def test_state_dict_keys_round_trip_and_unknown_keys_fail():
    cfg = tiny_config(bias=True)
    sd = random_internlm2_weights(cfg)
    llama_sd = {}
    for key, tensor in sd.items():
        llama_sd.update(internlm2_to_llama_tensors(key, tensor, cfg))
    assert llama_sd["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert llama_sd["model.layers.0.self_attn.k_proj.bias"].shape == (32,)
    back = llama_to_internlm2_state_dict(llama_sd, internlm2_to_llama_config(cfg))
    assert back.keys() == sd.keys()
    for key in sd:
        assert torch.equal(back[key], sd[key]), key

    with pytest.raises(ValueError, match="model.layers.0.attention.mystery.weight"):
        internlm2_to_llama_tensors("model.layers.0.attention.mystery.weight", torch.zeros(1), cfg)
    with pytest.raises(ValueError, match="vision_tower.weight"):
        llama_to_internlm2_state_dict({"vision_tower.weight": torch.zeros(1)}, LlamaConfig())


def test_config_round_trip_is_lossless():
    llama = internlm2_to_llama_config(PUBLISHED_7B)
    assert llama.rope_parameters["rope_theta"] == 1000000
    assert llama.rope_parameters["rope_type"] == "dynamic"
    assert llama.rms_norm_eps == 1e-5
    assert llama.attention_bias is False and llama.mlp_bias is False
    assert llama.head_dim == 128 and llama.num_key_value_heads == 8
    assert llama_to_internlm2_config(llama) == PUBLISHED_7B

    for overrides in (
        {"bias": True, "rope_scaling": None, "rope_theta": 10000, "rms_norm_eps": 1e-6},
        {"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 500000.5},
    ):
        cfg = {**PUBLISHED_7B, **overrides}
        assert llama_to_internlm2_config(internlm2_to_llama_config(cfg)) == cfg

    llama_back = internlm2_to_llama_config(llama_to_internlm2_config(llama))
    assert llama_back.to_dict() == llama.to_dict()
