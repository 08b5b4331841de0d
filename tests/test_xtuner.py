"""XTuner's LLaVA artifacts <-> run dirs: an imported run computes what XTuner's model computes.

The reference merges XTuner's LoRA into the InternLM2 weights in InternLM2's own layout
(W_wqkv + scale * B @ A, ...) and only then converts to Llama, so a wrong split of wqkv's LoRA
shows up as wrong logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import llava_tune
from llava_tune.cli import main
from llava_tune.config import load_config
from llava_tune.convert.internlm2 import internlm2_to_llama_config, internlm2_to_llama_tensors
from llava_tune.convert.xtuner import import_xtuner
from llava_tune.errors import UserError
from llava_tune.export import export
from llava_tune.rundir import save_config
from llava_tune.training.checkpoint import save_weights
from llava_tune.training.setup import build_for_training

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
R, ALPHA = 4, 8
VISION_WIDTH = 64
IDS = torch.tensor([[1, 5, 17, 42, 99, 250, 3, 7, 300, 11]])
XT_TARGETS = {"wqkv": "attention", "wo": "attention", "w1": "feed_forward",
              "w2": "feed_forward", "w3": "feed_forward"}


def lm_config(lm: Path) -> dict:
    return json.loads((lm / "config.json").read_text())


def module_io(cfg: dict, name: str) -> tuple[int, int]:
    c, h, kv, inter = (cfg["hidden_size"], cfg["num_attention_heads"],
                       cfg["num_key_value_heads"], cfg["intermediate_size"])
    d = c // h
    return {"wqkv": (c, (h + 2 * kv) * d), "wo": (h * d, c), "w1": (c, inter), "w3": (c, inter),
            "w2": (inter, c), "output": (c, cfg["vocab_size"])}[name]


def make_xtuner(out: Path, lm: Path, seed: int = 0, vision_width: int = VISION_WIDTH,
                bias: bool = True) -> Path:
    """A fake `xtuner convert pth_to_hf` LLaVA output: random projector + InternLM2 LoRA."""
    cfg = lm_config(lm)
    gen = torch.Generator().manual_seed(seed)
    c = cfg["hidden_size"]

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.05

    (out / "projector").mkdir(parents=True)
    projector = {"model.0.weight": rand(c, vision_width), "model.2.weight": rand(c, c)}
    if bias:
        projector.update({"model.0.bias": rand(c), "model.2.bias": rand(c)})
    save_file(projector, out / "projector" / "model.safetensors")
    (out / "projector" / "config.json").write_text(json.dumps({
        "architectures": ["ProjectorModel"], "model_type": "projector", "bias": bias,
        "depth": 2, "hidden_act": "gelu", "llm_hidden_size": c,
        "visual_hidden_size": vision_width, "torch_dtype": "float32"}))

    (out / "llm_adapter").mkdir()
    adapter = {}
    paths = [f"model.layers.{i}.{XT_TARGETS[n]}.{n}"
             for i in range(cfg["num_hidden_layers"]) for n in XT_TARGETS] + ["output"]
    for path in paths:
        fan_in, fan_out = module_io(cfg, path.rsplit(".", 1)[-1])
        adapter[f"base_model.model.{path}.lora_A.weight"] = rand(R, fan_in) * 2
        adapter[f"base_model.model.{path}.lora_B.weight"] = rand(fan_out, R) * 2
    save_file(adapter, out / "llm_adapter" / "adapter_model.safetensors")
    (out / "llm_adapter" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA,
        "lora_dropout": 0.05, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": ["wqkv", "wo", "w1", "w2", "w3", "output"],
        "base_model_name_or_path": "internlm/internlm2-chat-7b"}))
    return out


def reference_logits(lm: Path, adapter_dir: Path | None) -> torch.Tensor:
    """Base InternLM2 weights (+ an XTuner-layout LoRA merged in that layout) -> Llama -> logits."""
    cfg = lm_config(lm)
    sd = load_file(lm / "model.safetensors")
    if adapter_dir is not None:
        acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        lora = load_file(adapter_dir / "adapter_model.safetensors")
        for key in [k for k in lora if k.endswith("lora_A.weight")]:
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = lora[key], lora[key.replace("lora_A", "lora_B")]
            leaf = path.rsplit(".", 1)[-1]
            alpha = acfg.get("alpha_pattern", {}).get(leaf, acfg["lora_alpha"])
            assert a.shape[0] == acfg.get("rank_pattern", {}).get(leaf, acfg["r"])
            rank = a.shape[0] ** 0.5 if acfg.get("use_rslora") else a.shape[0]
            sd[path + ".weight"] = sd[path + ".weight"] + alpha / rank * (b @ a)
    llama = {}
    for key, tensor in sd.items():
        llama.update(internlm2_to_llama_tensors(key, tensor, cfg))
    model = LlamaForCausalLM(internlm2_to_llama_config(cfg)).float().eval()
    model.load_state_dict(llama, strict=True)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def run_logits(run_dir: Path) -> torch.Tensor:
    built = llava_tune.load_run(run_dir, device="cpu")
    with torch.no_grad():
        return built.model.llm(input_ids=IDS).logits


def vision_args(tiny_vision) -> dict:
    return {"vision_name": "tiny-vit", "vision_config_file": str(tiny_vision[0]),
            "vision_pretrained": str(tiny_vision[1])}


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_lm, tiny_vision):
    root = tmp_path_factory.mktemp("xtuner")
    xt = make_xtuner(root / "xtuner", tiny_lm)
    run = import_xtuner(xt, root / "run", llm=tiny_lm, **vision_args(tiny_vision))
    return root, xt, run


def test_imported_run_matches_xtuner_lora_merged_in_internlm2_layout(imported, tiny_lm):
    root, xt, run = imported
    logits = run_logits(run)
    expected = reference_logits(tiny_lm, xt / "llm_adapter")
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    # The LoRA matters: without it the logits are far away.
    assert (logits - reference_logits(tiny_lm, None)).abs().max() > 1e-2

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["stage"] == "finetune"
    assert config["model"]["llm"] == str(Path(tiny_lm).resolve())
    assert config["model"]["quantization"] is None
    assert config["model"]["vision"]["name"] == "tiny-vit"
    assert config["train"]["llm"] == "lora"
    assert config["train"]["lora"] == {
        "r": R, "alpha": ALPHA, "dropout": 0.05,
        "target_modules": sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                  "up_proj", "down_proj", "lm_head"])}
    adapter_config = json.loads((run / "llm_adapter" / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (R, ALPHA)
    assert adapter_config["task_type"] == "CAUSAL_LM"
    assert adapter_config["base_model_name_or_path"] == str(Path(tiny_lm).resolve())
    keys = load_file(run / "llm_adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in keys
    assert "base_model.model.lm_head.lora_A.weight" in keys
    # q, k and v share wqkv's lora_A.
    a = keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert torch.equal(a, keys["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"])


def test_projector_is_copied_exactly(imported):
    root, xt, run = imported
    original = load_file(xt / "projector" / "model.safetensors")
    copied = load_file(run / "projector" / "model.safetensors")
    assert copied.keys() == original.keys()
    for key in original:
        assert torch.equal(copied[key], original[key])
    built = llava_tune.load_run(run, device="cpu")
    for key, value in built.model.projector.state_dict().items():
        assert torch.equal(value, original[key])


def test_projector_shape_mismatch_names_expected_and_found(tmp_path, tiny_lm, tiny_vision):
    xt = make_xtuner(tmp_path / "xtuner", tiny_lm, vision_width=32)
    with pytest.raises(UserError) as err:
        import_xtuner(xt, tmp_path / "run", llm=tiny_lm, **vision_args(tiny_vision))
    message = str(err.value)
    assert "model.0.weight" in message and "(64, 32)" in message and "(64, 64)" in message
    assert "tiny-vit" in message
    assert not (tmp_path / "run").exists()


def test_projector_without_bias_and_without_adapter(tmp_path, tiny_lm, tiny_vision):
    xt = make_xtuner(tmp_path / "xtuner", tiny_lm, bias=False)
    shutil.rmtree(xt / "llm_adapter")
    run = import_xtuner(xt, tmp_path / "run", llm=tiny_lm, **vision_args(tiny_vision))
    state = load_file(run / "projector" / "model.safetensors")
    assert torch.equal(state["model.0.bias"], torch.zeros(64))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["stage"], config["train"]["llm"]) == ("pretrain", "frozen")
    assert not (run / "llm_adapter").exists()


def test_export_of_an_import_gives_back_the_xtuner_adapter(imported, tiny_lm, tiny_vision):
    root, xt, run = imported
    out = export(run, root / "export", "xtuner").path
    for name in ("projector", "llm_adapter"):
        original = load_file(xt / name / next((xt / name).glob("*.safetensors")).name)
        exported = load_file(out / name / next((out / name).glob("*.safetensors")).name)
        assert exported.keys() == original.keys()
        assert all(torch.equal(exported[k], original[k]) for k in original)
    adapter_config = json.loads((out / "llm_adapter" / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (R, ALPHA)
    assert "rank_pattern" not in adapter_config
    assert adapter_config["target_modules"] == ["output", "w1", "w2", "w3", "wo", "wqkv"]
    projector_config = json.loads((out / "projector" / "config.json").read_text())
    assert projector_config["visual_hidden_size"] == VISION_WIDTH
    assert (out / "projector" / "modeling_projector.py").is_file()

    again = import_xtuner(out, root / "reimported", llm=tiny_lm, **vision_args(tiny_vision))
    torch.testing.assert_close(run_logits(again), run_logits(run), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_independent_qkv_loras_export_by_stacking(imported, tiny_lm, tiny_vision, rslora):
    """Our runs train q, k and v LoRAs independently: wqkv gets rank 3r, same scale
    (alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    root, xt, run = imported
    native = root / f"native-{rslora}"
    shutil.copytree(run, native)
    config_file = native / "llm_adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "use_rslora": rslora}))
    file = native / "llm_adapter" / "adapter_model.safetensors"
    state = load_file(file)
    gen = torch.Generator().manual_seed(1)
    for key in [k for k in state if "_proj.lora_A" in k and "self_attn.o_proj" not in k]:
        state[key] = torch.randn(state[key].shape, generator=gen) * 0.2
    save_file(state, file)

    out = export(native, root / f"native-export-{rslora}", "xtuner").path
    adapter_config = json.loads((out / "llm_adapter" / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (R, ALPHA)
    assert adapter_config["rank_pattern"] == {"wqkv": 3 * R}
    alpha = ALPHA * 3**0.5 if rslora else 3 * ALPHA
    assert adapter_config["alpha_pattern"] == {"wqkv": pytest.approx(alpha)}
    assert adapter_config.get("use_rslora", False) == rslora
    exported = load_file(out / "llm_adapter" / "adapter_model.safetensors")
    assert exported["base_model.model.model.layers.0.attention.wqkv.lora_A.weight"].shape == (3 * R, 64)

    native_logits = run_logits(native)
    # The export, merged in InternLM2's layout, is the native run's function...
    torch.testing.assert_close(reference_logits(tiny_lm, out / "llm_adapter"), native_logits,
                               atol=1e-5, rtol=0)
    # ...and importing it back gives that function too.
    again = import_xtuner(out, root / f"native-reimported-{rslora}", llm=tiny_lm,
                          **vision_args(tiny_vision))
    torch.testing.assert_close(run_logits(again), native_logits, atol=1e-5, rtol=0)


def test_export_of_a_run_as_training_writes_it(tmp_path, tiny_lm, stage_overrides):
    """A finetune run saved by the trainer's own code (all-linear LoRA, random B), exported:
    XTuner's adapter merged in InternLM2's layout computes what the run computes."""
    config = load_config(DEMO / "finetune.yaml",
                         [*stage_overrides("finetune"), "model.quantization=null", "init_from="])
    built, _ = build_for_training(config, device="cpu")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in built.model.llm.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    run = Path(config.run_dir)
    save_config(run, config)
    save_weights(run, built.model, built, steps=0)

    out = export(run, tmp_path / "export", "xtuner").path
    adapter_config = json.loads((out / "llm_adapter" / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == ["w1", "w2", "w3", "wo", "wqkv"]
    torch.testing.assert_close(reference_logits(tiny_lm, out / "llm_adapter"), run_logits(run),
                               atol=1e-5, rtol=0)


def test_cli_import_and_export(tmp_path, tiny_lm, tiny_vision, capsys):
    xt = make_xtuner(tmp_path / "xtuner", tiny_lm, seed=3)
    vision = ["--vision", "tiny-vit", "--vision-weights", str(tiny_vision[1]),
              "--vision-config", str(tiny_vision[0])]
    code = main(["import-xtuner", str(xt), str(tmp_path / "run"), "--llm", str(tiny_lm), *vision])
    assert code == 0
    assert (tmp_path / "run" / "config.yaml").is_file()
    code = main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", "xtuner"])
    assert code == 0
    assert (tmp_path / "out" / "llm_adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "projector" / "model.safetensors").is_file()

    (tmp_path / "not-xtuner").mkdir()
    (tmp_path / "not-xtuner" / "model.safetensors").write_bytes(b"")
    capsys.readouterr()
    code = main(["import-xtuner", str(tmp_path / "not-xtuner"), str(tmp_path / "run2"),
                 "--llm", str(tiny_lm), *vision])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "not an XTuner LLaVA artifact" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run2").exists()
