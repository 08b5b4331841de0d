"""XTuner's LLaVA artifacts <-> run dirs: an imported run computes what XTuner's model computes.

The reference merges XTuner's LoRA into the InternLM2 weights in InternLM2's own layout
(W_wqkv + scale * B @ A, ...) and only then converts to Llama, so a wrong split of wqkv's LoRA
shows up as wrong logits.

(Over 400 lines: the XTuner reference model in its own layout is built here, once, for
both import and export.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

import llava_tune
from llava_tune.cli import main
from llava_tune.config import load_config
from llava_tune.constants import IMAGE_TOKEN_INDEX
from llava_tune.convert.internlm2 import internlm2_to_llama_config, internlm2_to_llama_tensors
from llava_tune.convert.xtuner import import_xtuner
from llava_tune.convert.xtuner.config_file import read_xtuner_config
from llava_tune.data.template import expand_image_slots
from llava_tune.errors import UserError
from llava_tune.export import export
from llava_tune.inference.chat import ChatSession
from llava_tune.inference.generate import GenerationSettings, stop_token_ids
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
    with torch.no_grad():
        return reference_llm(lm, adapter_dir)(input_ids=IDS).logits


def reference_llm(lm: Path, adapter_dir: Path | None) -> LlamaForCausalLM:
    """Base InternLM2 weights (+ an XTuner-layout LoRA merged in that layout) as a Llama."""
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
    return model


def run_logits(run_dir: Path) -> torch.Tensor:
    bundle = llava_tune.load_run(run_dir, device="cpu")
    with torch.no_grad():
        return bundle.model.llm(input_ids=IDS).logits


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
    bundle = llava_tune.load_run(run, device="cpu")
    for key, value in bundle.model.projector.state_dict().items():
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
    bundle, _ = build_for_training(config, device="cpu")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in bundle.model.llm.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    run = Path(config.run_dir)
    save_config(run, config)
    save_weights(run, bundle.model, bundle, steps=0)

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


# --------------------------------------------------------------------------- the vision tower
# XTuner's LLaVA recipe also trains a LoRA on transformers' CLIPVisionModel and publishes it as
# visual_encoder_adapter/. The references below are transformers' CLIP and peft's own merge.

CLIP = {"image_size": 32, "patch_size": 16, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 3, "num_attention_heads": 4}
VR, VALPHA = 8, 16
QUESTION = "What color is the shape?"

# mmengine's dump of XTuner's LLaVA finetune recipe, as published next to the adapters
# (llava_internlm2_chat_7b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune), trimmed of
# the dataset and hook sections, with the two LLaVAModel arguments the recipe leaves at their
# defaults written out.
XTUNER_CONFIG_DUMP = """\
SYSTEM = ''
accumulative_counts = 1
batch_size = 16
betas = (
    0.9,
    0.999,
)
data_path = './data/llava_data/LLaVA-Instruct-150K/llava_v1_5_mix665k.json'
evaluation_inputs = [
    '请描述一下这张照片',
    'Please describe this picture',
]
llm_name_or_path = 'internlm/internlm2-chat-7b'
lr = 0.0002
max_length = 1472
model = dict(
    freeze_llm=True,
    freeze_visual_encoder=True,
    llm=dict(
        pretrained_model_name_or_path='internlm/internlm2-chat-7b',
        quantization_config=dict(
            bnb_4bit_compute_dtype='torch.float16',
            bnb_4bit_quant_type='nf4',
            bnb_4bit_use_double_quant=True,
            llm_int8_has_fp16_weight=False,
            llm_int8_threshold=6.0,
            load_in_4bit=True,
            load_in_8bit=False,
            type='transformers.BitsAndBytesConfig'),
        torch_dtype='torch.float16',
        trust_remote_code=True,
        type='transformers.AutoModelForCausalLM.from_pretrained'),
    llm_lora=dict(
        bias='none',
        lora_alpha=256,
        lora_dropout=0.05,
        r=512,
        task_type='CAUSAL_LM',
        type='peft.LoraConfig'),
    pretrained_pth=
    './work_dirs/llava_internlm2_chat_7b_clip_vit_large_p14_336_e1_gpu8_pretrain/iter_2181.pth',
    projector_depth=2,
    type='xtuner.model.LLaVAModel',
    visual_encoder=dict(
        pretrained_model_name_or_path='openai/clip-vit-large-patch14-336',
        type='transformers.CLIPVisionModel.from_pretrained'),
    visual_encoder_lora=dict(
        bias='none',
        lora_alpha=16,
        lora_dropout=0.05,
        r=64,
        type='peft.LoraConfig'),
    visual_select_layer=-2)
optim_type = 'torch.optim.AdamW'
prompt_template = 'xtuner.utils.PROMPT_TEMPLATE.internlm2_chat'
randomness = dict(deterministic=False, seed=None)
save_steps = 500
visual_encoder_name_or_path = 'openai/clip-vit-large-patch14-336'
"""

# The recipe's own source (what a work_dir holds before mmengine dumps it): imports, names of
# classes and of earlier variables, arithmetic.
XTUNER_CONFIG_SOURCE = """\
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, CLIPVisionModel
from xtuner.model import LLaVAModel
from xtuner.utils import PROMPT_TEMPLATE

llm_name_or_path = 'internlm/internlm2-chat-1_8b'
visual_encoder_name_or_path = 'openai/clip-vit-large-patch14-336'
prompt_template = PROMPT_TEMPLATE.internlm2_chat
max_length = int(2048 - (336 / 14)**2)
select_layer = -3

model = dict(
    type=LLaVAModel,
    freeze_llm=True,
    freeze_visual_encoder=True,
    visual_select_layer=select_layer,
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=llm_name_or_path,
        torch_dtype=torch.float16),
    visual_encoder=dict(
        type=CLIPVisionModel.from_pretrained,
        pretrained_model_name_or_path=visual_encoder_name_or_path),
    visual_encoder_lora=dict(
        type=LoraConfig, r=64, lora_alpha=16, lora_dropout=0.05, bias='none'))
"""


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """The tower XTuner trains with, as users hold it: a Hugging Face CLIPVisionModel folder
    (QuickGELU, like OpenAI's CLIP)."""
    folder = tmp_path_factory.mktemp("clip") / "clip-vit-tiny"
    torch.manual_seed(5)
    CLIPVisionModel(CLIPVisionConfig(**CLIP, hidden_act="quick_gelu")).save_pretrained(folder)
    return folder


def clip_linear_names(model: torch.nn.Module) -> list[str]:
    """XTuner's find_all_linear_names: the last name of every nn.Linear."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def add_visual_encoder_adapter(xt: Path, clip_dir: Path, seed: int = 7, transformers4: bool = True,
                               bin_file: bool = False, clip: dict | None = None):
    """XTuner's visual_encoder_adapter/: peft's LoRA on a CLIPVisionModel (r=8, alpha=16,
    dropout 0.05, every Linear), trained (random A and B), saved by peft. `transformers4`: keys
    as XTuner's published files have them (`vision_model.` in the module paths). Returns the
    reference tower: transformers' CLIPVisionModel with peft's merge of that LoRA."""
    if clip is None:
        model = CLIPVisionModel.from_pretrained(clip_dir).eval()
    else:
        torch.manual_seed(seed)
        model = CLIPVisionModel(CLIPVisionConfig(**clip, hidden_act="quick_gelu")).eval()
    targets = clip_linear_names(model)
    assert targets == sorted(["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    lora = peft.get_peft_model(model, peft.LoraConfig(
        r=VR, lora_alpha=VALPHA, lora_dropout=0.05, bias="none", target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    folder = xt / "visual_encoder_adapter"
    lora.save_pretrained(folder, safe_serialization=not bin_file)
    file = folder / ("adapter_model.bin" if bin_file else "adapter_model.safetensors")
    state = torch.load(file, weights_only=True) if bin_file else load_file(file)
    assert all(k.startswith("base_model.model.encoder.layers.") for k in state)
    if transformers4:
        state = {k.replace("base_model.model.", "base_model.model.vision_model.", 1): v
                 for k, v in state.items()}
    if bin_file:
        torch.save(state, file)
    else:
        save_file(state, file)
    return lora.merge_and_unload().eval()


def clip_features(model: CLIPVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """What XTuner's LLaVA feeds its projector: hidden_states[-2] without CLS. [B, N, W]"""
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]


def make_full_xtuner(root: Path, tiny_lm: Path, clip_dir: Path, **adapter):
    xt = make_xtuner(root / "xtuner", tiny_lm)
    reference = add_visual_encoder_adapter(xt, clip_dir, **adapter)
    (xt / "xtuner_config.py").write_text(XTUNER_CONFIG_DUMP)
    return xt, reference


@pytest.fixture(scope="module")
def imported_vision(tmp_path_factory, tiny_lm, clip_dir):
    root = tmp_path_factory.mktemp("xtuner-vision")
    xt, reference = make_full_xtuner(root, tiny_lm, clip_dir)
    notes = []
    run = import_xtuner(xt, root / "run", llm=tiny_lm, vision_name="ignored-for-a-folder",
                        vision_pretrained=str(clip_dir), on_note=notes.append)
    return root, xt, run, reference, notes


def test_imported_tower_lora_gives_clip_features_with_the_adapter_merged(imported_vision,
                                                                         clip_dir):
    root, xt, run, reference, notes = imported_vision
    bundle = llava_tune.load_run(run, device="cpu")
    torch.manual_seed(11)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = bundle.model.vision(pixels)
    torch.testing.assert_close(ours, clip_features(reference, pixels), atol=1e-5, rtol=0)
    # The LoRA matters: the base CLIP computes something else.
    base = CLIPVisionModel.from_pretrained(clip_dir).eval()
    assert (ours - clip_features(base, pixels)).abs().max() > 1e-2

    assert sorted(os.listdir(run)) == ["COMPLETE", "config.yaml", "llm_adapter", "projector",
                                       "vision_adapter"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["vision"]["pretrained"] == str(clip_dir.resolve())
    assert config["model"]["vision"]["feature_layer"] == -2
    assert config["train"]["vision"] == "lora"
    assert config["train"]["vision_lora"] == {
        "r": VR, "alpha": VALPHA, "dropout": 0.05,
        "target_modules": ["c_fc", "c_proj", "k_proj", "out_proj", "q_proj", "v_proj"]}
    # A rename, tensors untouched: the original's q_proj of layer 1 is our resblock 1's.
    original = load_file(xt / "visual_encoder_adapter" / "adapter_model.safetensors")
    ours_state = load_file(run / "vision_adapter" / "adapter_model.safetensors")
    assert len(ours_state) == len(original) == 3 * 6 * 2
    assert torch.equal(
        ours_state["base_model.model.transformer.resblocks.1.mlp.c_fc.lora_B.weight"],
        original["base_model.model.vision_model.encoder.layers.1.mlp.fc1.lora_B.weight"])


def test_imported_model_chats_like_xtuners(imported_vision, tiny_lm, shapes_data):
    """The whole model: XTuner's computation (CLIP + merged LoRA -> hidden_states[-2] ->
    projector -> InternLM2 with its LoRA merged in its own layout) against `load_run` + chat."""
    root, xt, run, reference, notes = imported_vision
    bundle = llava_tune.load_run(run, device="cpu")
    image = Image.open(shapes_data / "images" / "heldout" / "000000.png")
    messages = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
    ids = bundle.template.prompt_ids(messages, bundle.tokenizer)
    image_id = bundle.tokenizer.convert_tokens_to_ids("<image>")
    ids, _ = expand_image_slots(ids, None, image_id, bundle.model.vision.num_patches)
    pixels = bundle.image_processor(image)

    llm = reference_llm(tiny_lm, xt / "llm_adapter")
    projector = load_file(xt / "projector" / "model.safetensors")

    def reference_logits_for(tokens: list[int]) -> torch.Tensor:
        features = clip_features(reference, pixels)[0]
        hidden = F.linear(features, projector["model.0.weight"], projector["model.0.bias"])
        features = F.linear(F.gelu(hidden), projector["model.2.weight"], projector["model.2.bias"])
        ids_tensor = torch.tensor(tokens)
        embeds = llm.get_input_embeddings()(ids_tensor.clamp(min=0))
        embeds[ids_tensor == IMAGE_TOKEN_INDEX] = features
        with torch.no_grad():
            return llm(inputs_embeds=embeds[None]).logits[0]

    with torch.no_grad():
        ours = bundle.model.logits(torch.tensor([ids]), pixels)[0]
    torch.testing.assert_close(ours, reference_logits_for(ids), atol=1e-4, rtol=0)

    # Greedy decoding by the reference gives `llava-tune chat`'s answer.
    stops = set(stop_token_ids(bundle))
    tokens, answer = list(ids), []
    for _ in range(6):
        nxt = int(reference_logits_for(tokens)[-1].argmax())
        if nxt in stops:
            break
        tokens.append(nxt)
        answer.append(nxt)
    session = ChatSession(bundle, settings=GenerationSettings(max_new_tokens=6))
    session.attach_image(shapes_data / "images" / "heldout" / "000000.png")
    expected = bundle.tokenizer.decode(answer, skip_special_tokens=True).strip()
    assert session.ask(QUESTION) == expected


def test_xtuner_config_values_are_taken_and_reported(imported_vision):
    root, xt, run, reference, notes = imported_vision
    assert any("template internlm2_chat (prompt_template)" in n
               and "feature layer -2 (model.visual_select_layer=-2)" in n
               and "projector depth 2 (model.projector_depth)" in n for n in notes), notes


@pytest.mark.parametrize("transformers4, bin_file", [(True, False), (True, True), (False, False)])
def test_reexport_gives_back_the_visual_encoder_adapter(tmp_path, tiny_lm, clip_dir,
                                                        transformers4, bin_file):
    xt = make_xtuner(tmp_path / "xtuner", tiny_lm)
    add_visual_encoder_adapter(xt, clip_dir, transformers4=transformers4, bin_file=bin_file)
    run = import_xtuner(xt, tmp_path / "run", llm=tiny_lm, vision_name="x",
                        vision_pretrained=str(clip_dir))
    out = export(run, tmp_path / "export", "xtuner").path
    folder = xt / "visual_encoder_adapter"
    original = (torch.load(folder / "adapter_model.bin", weights_only=True) if bin_file
                else load_file(folder / "adapter_model.safetensors"))
    exported = load_file(out / "visual_encoder_adapter" / "adapter_model.safetensors")
    # Exports name modules as XTuner's published (transformers 4) adapters do.
    expected = {k if transformers4 else
                k.replace("base_model.model.", "base_model.model.vision_model.", 1): v
                for k, v in original.items()}
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    config = json.loads((out / "visual_encoder_adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (VR, VALPHA, 0.05)
    assert config["target_modules"] == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(clip_dir.resolve())
    assert config["peft_type"] == "LORA" and config.get("use_dora") is None
    # The LLM side still round-trips bit for bit.
    original_llm = load_file(xt / "llm_adapter" / "adapter_model.safetensors")
    exported_llm = load_file(out / "llm_adapter" / "adapter_model.safetensors")
    assert all(torch.equal(exported_llm[k], original_llm[k]) for k in original_llm)


def test_hf_llava_export_of_an_import_merges_the_tower_lora(imported_vision, tmp_path):
    root, xt, run, reference, notes = imported_vision
    out = export(run, tmp_path / "hf", "hf-llava").path
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    torch.manual_seed(12)
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(clip_features(model.model.vision_tower, pixels),
                               clip_features(reference, pixels), atol=1e-5, rtol=0)


def test_import_without_vision_weights_takes_the_folder_from_the_fix(tmp_path, tiny_lm, clip_dir):
    xt, _ = make_full_xtuner(tmp_path, tiny_lm, clip_dir)
    with pytest.raises(UserError) as err:
        import_xtuner(xt, tmp_path / "run", llm=tiny_lm, vision_name="ViT-L-14-336-quickgelu")
    message = str(err.value)
    assert "--vision-weights" in message and "openai/clip-vit-large-patch14-336" in message
    assert not (tmp_path / "run").exists()


def _expect_refusal(xt: Path, run: Path, tiny_lm: Path, vision: str, *fragments: str) -> None:
    with pytest.raises(UserError) as err:
        import_xtuner(xt, run, llm=tiny_lm, vision_name="x", vision_pretrained=vision)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, message
    assert not run.exists()


def test_adapter_on_a_module_our_tower_lacks_is_refused(tmp_path, tiny_lm, clip_dir):
    xt, _ = make_full_xtuner(tmp_path, tiny_lm, clip_dir)
    file = xt / "visual_encoder_adapter" / "adapter_model.safetensors"
    state = load_file(file)
    # A packed qkv projection, as InternViT's adapters have: no CLIPVisionModel module.
    state["base_model.model.vision_model.encoder.layers.0.self_attn.qkv.lora_A.weight"] = torch.zeros(VR, 64)
    state["base_model.model.vision_model.encoder.layers.0.self_attn.qkv.lora_B.weight"] = torch.zeros(192, VR)
    save_file(state, file)
    _expect_refusal(xt, tmp_path / "run", tiny_lm, str(clip_dir), str(file),
                    "encoder.layers.0.self_attn.qkv", "target_modules")


def test_adapter_of_another_tower_is_refused(tmp_path, tiny_lm, clip_dir):
    xt = make_xtuner(tmp_path / "xtuner", tiny_lm)
    add_visual_encoder_adapter(xt, clip_dir, clip={**CLIP, "num_hidden_layers": 4})
    _expect_refusal(xt, tmp_path / "run", tiny_lm, str(clip_dir),
                    "encoder.layers.3", "beyond the 3 layers", "--vision-weights")
    shutil.rmtree(xt / "visual_encoder_adapter")
    add_visual_encoder_adapter(xt, clip_dir, clip={**CLIP, "intermediate_size": 96})
    _expect_refusal(xt, tmp_path / "run", tiny_lm, str(clip_dir),
                    "adapter_model.safetensors", "mlp.fc1 maps 64 -> 96", "64 -> 128",
                    "--vision-weights")


def test_adapter_whose_rank_disagrees_with_its_config_is_refused(tmp_path, tiny_lm, clip_dir):
    xt, _ = make_full_xtuner(tmp_path, tiny_lm, clip_dir)
    config_file = xt / "visual_encoder_adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "r": 4}))
    _expect_refusal(xt, tmp_path / "run", tiny_lm, str(clip_dir), "adapter_model.safetensors",
                    "not rank 4", "adapter_config.json")


def test_a_fully_trained_visual_encoder_must_be_the_tower(tmp_path, tiny_lm, clip_dir):
    xt = make_xtuner(tmp_path / "xtuner", tiny_lm)
    torch.manual_seed(9)
    trained = CLIPVisionModel(CLIPVisionConfig(**CLIP, hidden_act="quick_gelu")).eval()
    trained.save_pretrained(xt / "visual_encoder")
    # Given another tower, or none, the trained one would be lost.
    _expect_refusal(xt, tmp_path / "run", tiny_lm, str(clip_dir),
                    str(xt / "visual_encoder"), f"--vision-weights {xt / 'visual_encoder'}")
    with pytest.raises(UserError, match="--vision-weights"):
        import_xtuner(xt, tmp_path / "run", llm=tiny_lm, vision_name="x")
    run = import_xtuner(xt, tmp_path / "run", llm=tiny_lm, vision_name="x",
                        vision_pretrained=str(xt / "visual_encoder"))
    bundle = llava_tune.load_run(run, device="cpu")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model.vision(pixels), clip_features(trained, pixels),
                                   atol=1e-5, rtol=0)


def test_a_folder_that_is_not_clip_is_refused(tmp_path, tiny_lm, clip_dir):
    xt, _ = make_full_xtuner(tmp_path, tiny_lm, clip_dir)
    (tmp_path / "not-clip").mkdir()
    (tmp_path / "not-clip" / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    _expect_refusal(xt, tmp_path / "run", tiny_lm, str(tmp_path / "not-clip"),
                    str(tmp_path / "not-clip"), "clip_vision_model", "'siglip'")
    _expect_refusal(xt, tmp_path / "run", tiny_lm, str(tmp_path / "missing"),
                    str(tmp_path / "missing"), "not found")


def test_xtuner_config_parser_reads_the_dump_and_the_source(tmp_path):
    dump = tmp_path / "dump.py"
    dump.write_text(XTUNER_CONFIG_DUMP)
    settings = read_xtuner_config(dump)
    assert (settings.template, settings.visual_select_layer, settings.projector_depth) == (
        "internlm2_chat", -2, 2)
    assert settings.visual_encoder == "openai/clip-vit-large-patch14-336"
    assert settings.llm == "internlm/internlm2-chat-7b"
    assert settings.visual_encoder_lora == {"bias": "none", "lora_alpha": 16,
                                            "lora_dropout": 0.05, "r": 64}

    source = tmp_path / "source.py"
    source.write_text(XTUNER_CONFIG_SOURCE)
    settings = read_xtuner_config(source)
    assert (settings.template, settings.visual_select_layer, settings.projector_depth) == (
        "internlm2_chat", -3, None)
    assert settings.visual_encoder == "openai/clip-vit-large-patch14-336"
    assert settings.llm == "internlm/internlm2-chat-1_8b"

    # An older mmengine dump spells the template out.
    spelled = tmp_path / "spelled.py"
    spelled.write_text(
        "prompt_template = dict(\n"
        "    INSTRUCTION='<|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n',\n"
        "    SEP='\\n', STOP_WORDS=['<|im_end|>'], SUFFIX='<|im_end|>', SUFFIX_AS_EOS=True,\n"
        "    SYSTEM='<|im_start|>system\\n{system}<|im_end|>\\n')\n")
    assert read_xtuner_config(spelled).template == "internlm2_chat"


def test_xtuner_config_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    file = tmp_path / "xtuner_config.py"
    file.write_text(f"import os\nos.system('touch {marker}')\n"
                    f"model = dict(visual_select_layer=__import__('os').system('touch {marker}'),"
                    " projector_depth=2)\n")
    settings = read_xtuner_config(file)
    assert not marker.exists()
    assert (settings.visual_select_layer, settings.projector_depth) == (None, 2)
    file.write_text("model = dict(\n")
    with pytest.raises(UserError, match="not valid Python"):
        read_xtuner_config(file)


def test_feature_layer_from_xtuner_config_and_its_override(tmp_path, tiny_lm, clip_dir):
    xt = make_xtuner(tmp_path / "xtuner", tiny_lm)
    (xt / "xtuner_config.py").write_text(XTUNER_CONFIG_SOURCE)
    notes = []
    run = import_xtuner(xt, tmp_path / "run", llm=tiny_lm, vision_name="x",
                        vision_pretrained=str(clip_dir), on_note=notes.append)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["vision"]["feature_layer"] == -3
    assert any("feature layer -3 (model.visual_select_layer=-3)" in n for n in notes), notes
    assert any("projector_depth 2" in n for n in notes), notes  # left at XTuner's default

    notes = []
    run = import_xtuner(xt, tmp_path / "run2", llm=tiny_lm, vision_name="x",
                        vision_pretrained=str(clip_dir), feature_layer=-2, on_note=notes.append)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["vision"]["feature_layer"] == -2
    assert any("--feature-layer -2 replaces" in n for n in notes), notes

    # A positive layer counts transformers' hidden_states (embeddings first): block k - 1.
    (xt / "xtuner_config.py").write_text("model = dict(visual_select_layer=2)\n")
    run = import_xtuner(xt, tmp_path / "run3", llm=tiny_lm, vision_name="x",
                        vision_pretrained=str(clip_dir))
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["vision"]["feature_layer"] == 1


def test_a_template_we_do_not_have_is_refused(tmp_path, tiny_lm, clip_dir):
    xt = make_xtuner(tmp_path / "xtuner", tiny_lm)
    (xt / "xtuner_config.py").write_text("prompt_template = 'xtuner.utils.PROMPT_TEMPLATE.vicuna'\n")
    _expect_refusal(xt, tmp_path / "run", tiny_lm, str(clip_dir), "xtuner_config.py", "vicuna",
                    "internlm2_chat")
    (xt / "xtuner_config.py").write_text("model = dict(projector_depth=3)\n")
    _expect_refusal(xt, tmp_path / "run", tiny_lm, str(clip_dir), "projector_depth=3",
                    "has 2 layers")


def test_cli_import_of_the_published_layout_reports_what_it_took(tmp_path, tiny_lm, clip_dir,
                                                                 capsys):
    xt, _ = make_full_xtuner(tmp_path, tiny_lm, clip_dir)
    code = main(["import-xtuner", str(xt), str(tmp_path / "run"), "--llm", str(tiny_lm),
                 "--vision-weights", str(clip_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert "template internlm2_chat (prompt_template)" in out
    assert (tmp_path / "run" / "vision_adapter" / "adapter_config.json").is_file()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", "xtuner"]) == 0
    assert (tmp_path / "out" / "visual_encoder_adapter" / "adapter_model.safetensors").is_file()


def test_an_imported_run_keeps_training_its_tower_lora(imported_vision, stage_overrides,
                                                       clip_dir):
    """init_from an import: XTuner's vision LoRA (r=8, alpha=16) continues as train.vision=lora."""
    root, xt, run, reference, notes = imported_vision
    config = load_config(DEMO / "finetune.yaml", [
        *stage_overrides("finetune"), f"init_from={run}", "model.quantization=null",
        f"model.vision.pretrained={clip_dir}", "train.vision=lora",
        f"train.vision_lora.r={VR}", f"train.vision_lora.alpha={VALPHA}",
        f"train.lora.r={R}", f"train.lora.alpha={ALPHA}"])
    bundle, carried = build_for_training(config, device="cpu")
    assert carried == ["projector", "llm_adapter", "vision_adapter"]
    trainable = [n for n, p in bundle.model.vision.named_parameters() if p.requires_grad]
    assert len(trainable) == 3 * 6 * 2 and all("lora_" in n for n in trainable)
    torch.manual_seed(13)
    pixels = torch.randn(1, 3, 32, 32)
    bundle.model.vision.eval()
    with torch.no_grad():
        torch.testing.assert_close(bundle.model.vision(pixels), clip_features(reference, pixels),
                                   atol=1e-5, rtol=0)
