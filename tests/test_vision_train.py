"""train.vision = lora | full on the tiny fixtures: gradients reach the tower only when it
trains; the run saves, loads, chats, evaluates and exports it (hf-llava with the LoRA merged,
xtuner as CLIPVisionModel names, checked against transformers' CLIP); init_from carries it.

(Over 400 lines: every path a trained tower takes, save, load, chat, eval, export, share
one tiny trained run.)
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from helpers import SMALL, overrides_in
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaForConditionalGeneration

import llava_tune
from llava_tune.assembly.model import build_tower
from llava_tune.cli import main
from llava_tune.config import load_config
from llava_tune.constants import IMAGE_TOKEN_INDEX
from llava_tune.convert.open_clip import hf_clip_vision_state_dict
from llava_tune.data.collate import Batch, Collator
from llava_tune.errors import UserError
from llava_tune.export import export
from llava_tune.inference.chat import ChatSession
from llava_tune.inference.generate import GenerationSettings
from llava_tune.training.checkpoint import save_weights
from llava_tune.training.loop import fit
from llava_tune.training.setup import build_dataset, build_for_training, setup

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"
OURS = ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")
TOWER = [*SMALL, "init_from=null", "model.quantization=null", "train.lr=1e-2",
         "train.vision_lora.r=4", "train.vision_lora.alpha=8", "train.lora.r=4"]
"""SMALL for these runs: from the base LLM in full precision, small LoRAs, a fast lr."""


def subset(source: Path, out: Path, n: int) -> Path:
    out.write_text(json.dumps(json.loads(source.read_text())[:n]))
    return out


def make_config(stage_overrides, shapes_data, tmp: Path, run: str, *extra: str):
    data = subset(shapes_data / "finetune.json", tmp / "finetune4.json", 4)
    return load_config(DEMO / "finetune.yaml",
                       [*stage_overrides("finetune", run), *TOWER, f"data.train={data}", *extra])


def first_batch(bundle, config) -> Batch:
    dataset = build_dataset(config, bundle, config.data.train)
    return Collator(bundle.tokenizer.pad_token_id)([dataset[i] for i in range(4)])


@torch.no_grad()
def logits(model, batch: Batch) -> torch.Tensor:
    model.eval()
    return model.logits(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask)


class Trained:
    def __init__(self, run_dir: Path, model, config) -> None:
        self.run_dir, self.model, self.config = run_dir, model, config


def train(config) -> Trained:
    run = setup(config)
    try:
        fit(run, lambda event: None)
    finally:
        run.close()
    return Trained(Path(config.run_dir), run.accelerator.unwrap_model(run.model), config)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vision-train")


@pytest.fixture(scope="module")
def module_overrides(tiny_lm, tiny_vision, shapes_data, module_tmp):
    """conftest's stage_overrides, for module-scoped runs."""
    return overrides_in(module_tmp, tiny_lm, tiny_vision, shapes_data)


@pytest.fixture(scope="module")
def lora_run(module_overrides, shapes_data, module_tmp) -> Trained:
    return train(make_config(module_overrides, shapes_data, module_tmp, "lora",
                             "train.vision=lora", "train.max_steps=3", "train.save_every=2"))


@pytest.fixture(scope="module")
def full_run(module_overrides, shapes_data, module_tmp) -> Trained:
    return train(make_config(module_overrides, shapes_data, module_tmp, "full",
                             "train.vision=full", "train.max_steps=3", "train.lr=1e-3"))


def base_tower(config):
    return build_tower(config.model)


def pixels_of(seed: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- gradients


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory) -> Path:
    """A Hugging Face CLIPVisionModel folder of the tiny tower's size (64 wide, 3 blocks)."""
    folder = tmp_path_factory.mktemp("hf-clip") / "clip"
    torch.manual_seed(6)
    CLIPVisionModel(CLIPVisionConfig(
        image_size=32, patch_size=16, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=2, hidden_act="quick_gelu")).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tower", ["open_clip", "hf_folder"])
@pytest.mark.parametrize("mode", ["frozen", "lora", "full"])
def test_gradients_reach_the_tower_only_when_it_trains(stage_overrides, shapes_data, tmp_path,
                                                        hf_clip, mode, tower):
    extra = [f"model.vision.pretrained={hf_clip}"] if tower == "hf_folder" else []
    config = make_config(stage_overrides, shapes_data, tmp_path, "run", f"train.vision={mode}",
                         *extra)
    bundle, _ = build_for_training(config, device="cpu")
    model = bundle.model
    model.train()
    assert model.vision.training == (mode != "frozen")
    if mode == "lora":
        # Fresh LoRA B is zero (no change yet); give it values so A gets gradients too.
        with torch.no_grad():
            for name, param in model.vision.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
    batch = first_batch(bundle, config)
    out = model(**batch.model_inputs())
    out.loss_sum.backward()

    trainable = {n: p for n, p in model.vision.named_parameters() if p.requires_grad}
    got_grad = {n for n, p in trainable.items() if p.grad is not None and p.grad.abs().max() > 0}
    # feature_layer -2 of 3 blocks: blocks 0 and 1 feed the projector, block 2 does not.
    used = [n for n in trainable if ".resblocks.2." not in n and "ln_post" not in n
            and not n.endswith(".proj")]
    if mode == "frozen":
        assert trainable == {}
        assert all(p.grad is None for p in model.vision.parameters())
    elif mode == "lora":
        assert {n.split(".")[-4] for n in trainable} == set(OURS)
        assert all("lora_" in n for n in trainable)
        assert len(trainable) == 3 * len(OURS) * 2
        assert set(used) <= got_grad and len(used) == 2 * len(OURS) * 2
    else:
        assert set(trainable) == {n for n, _ in model.vision.named_parameters()}
        assert set(used) <= got_grad
        assert {"visual.transformer.resblocks.0.attn.q_proj.weight", "visual.conv1.weight",
                "visual.transformer.resblocks.1.mlp.c_fc.weight"} <= got_grad
    # The projector trains in every mode.
    assert all(p.grad is not None for p in model.projector.parameters())


def test_gradient_checkpointing_of_a_training_tower_gives_the_same_gradients(
        stage_overrides, shapes_data, tmp_path):
    grads, flags = [], []
    for checkpointing in (False, True):
        config = make_config(stage_overrides, shapes_data, tmp_path, f"run{checkpointing}",
                             "train.vision=lora",
                             f"train.gradient_checkpointing={str(checkpointing).lower()}")
        torch.manual_seed(0)
        bundle, _ = build_for_training(config, device="cpu")
        model = bundle.model
        with torch.no_grad():
            for name, param in model.vision.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(
                        len(name))) * 0.1)
        flags.append(model.vision.base.transformer.grad_checkpointing)
        model.train()
        for module in model.modules():  # dropout off: the two runs must see the same function
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model(**first_batch(bundle, config).model_inputs()).loss_sum.backward()
        grads.append({n: p.grad.clone() for n, p in model.vision.named_parameters()
                      if p.grad is not None})
    assert flags == [False, True]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)

    config = make_config(stage_overrides, shapes_data, tmp_path, "frozen",
                         "train.gradient_checkpointing=true")
    bundle, _ = build_for_training(config, device="cpu")
    assert not bundle.model.vision.base.transformer.grad_checkpointing  # nothing to recompute


# --------------------------------------------------------------------------- lora run


def test_lora_run_dir_holds_the_tower_adapter(lora_run):
    run = lora_run.run_dir
    assert json.loads((run / "COMPLETE").read_text())["parts"] == [
        "projector", "llm_adapter", "vision_adapter"]
    assert not (run / "vision").exists()
    config = json.loads((run / "vision_adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(OURS)
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    state = load_file(run / "vision_adapter" / "adapter_model.safetensors")
    assert len(state) == 3 * len(OURS) * 2
    assert "base_model.model.transformer.resblocks.0.attn.q_proj.lora_B.weight" in state
    # Trained: LoRA B starts at zero, the used blocks' moved.
    assert state["base_model.model.transformer.resblocks.0.mlp.c_fc.lora_B.weight"].abs().max() > 0


def test_lora_run_loads_back_with_the_same_logits(lora_run):
    bundle = llava_tune.load_run(lora_run.run_dir)
    assert isinstance(bundle.model.vision.visual, peft.PeftModel)
    assert not any(p.requires_grad for p in bundle.model.parameters())
    batch = first_batch(bundle, bundle.config)
    expected = logits(lora_run.model, batch)
    torch.testing.assert_close(logits(bundle.model, batch), expected, rtol=1e-5, atol=1e-5)
    with bundle.model.vision.visual.disable_adapter():
        without = logits(bundle.model, batch)
    assert not torch.allclose(without, expected, atol=1e-4)  # the tower's LoRA is in use


def test_lora_run_checkpoint_loads(lora_run):
    checkpoint = lora_run.run_dir / "checkpoints" / "step-0000002"
    state = load_file(checkpoint / "trainable.safetensors")
    assert any(".visual." in k and "lora_B" in k for k in state)
    bundle = llava_tune.load_run(checkpoint)
    assert isinstance(bundle.model.vision.visual, peft.PeftModel)
    assert torch.isfinite(logits(bundle.model, first_batch(bundle, bundle.config))).all()


def test_lora_run_chats_and_evaluates(lora_run, shapes_data, tmp_path, capsys):
    bundle = llava_tune.load_run(lora_run.run_dir)
    session = ChatSession(bundle, settings=GenerationSettings(max_new_tokens=4))
    session.attach_image(shapes_data / "images" / "heldout" / "000000.png")
    assert isinstance(session.ask("What color is the shape?"), str)
    heldout = subset(shapes_data / "heldout.json", tmp_path / "heldout4.json", 4)
    code = main(["eval", str(lora_run.run_dir), "--data", str(heldout), "--image-folder",
                 str(shapes_data / "images"), "--json", str(tmp_path / "acc.json"),
                 "--max-new-tokens", "4"])
    assert code == 0
    assert json.loads((tmp_path / "acc.json").read_text())["total"] == 4


def test_lora_run_hf_llava_export_merges_the_tower_lora(lora_run, tmp_path):
    out = export(lora_run.run_dir, tmp_path / "hf", "hf-llava").path
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ours = llava_tune.load_run(lora_run.run_dir)
    batch = first_batch(ours, ours.config)
    image_id = model.config.image_token_id
    ids = batch.input_ids.masked_fill(batch.input_ids == IMAGE_TOKEN_INDEX, image_id)
    with torch.no_grad():
        theirs = model(input_ids=ids, pixel_values=batch.pixel_values,
                       attention_mask=batch.attention_mask).logits
    mine = logits(ours.model, batch)
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(theirs[..., : mine.shape[-1]][mask], mine[mask], rtol=1e-4,
                               atol=1e-4)
    # The exported tower is the merged one, not the base CLIP.
    pixels = pixels_of(1)
    with torch.no_grad():
        exported = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(exported, ours.model.vision(pixels), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(exported, base_tower(ours.config)(pixels), atol=1e-4)


def test_lora_run_xtuner_export_is_a_lora_on_clip_vision_model(lora_run, tmp_path):
    """Merged by hand into transformers' CLIPVisionModel (W += alpha/r * B @ A per module
    named in the export), the exported adapter computes our tower's features."""
    out = export(lora_run.run_dir, tmp_path / "xt", "xtuner").path
    folder = out / "visual_encoder_adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
    state = load_file(folder / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.vision_model.encoder.layers.") for k in state)
    assert len(state) == 3 * len(OURS) * 2

    tower = base_tower(lora_run.config)
    clip_config, clip_state = hf_clip_vision_state_dict(tower.base)
    clip = CLIPVisionModel(clip_config).eval()
    clip.load_state_dict(clip_state)
    weights = dict(clip.named_parameters())
    scale = config["lora_alpha"] / config["r"]
    with torch.no_grad():
        for key in [k for k in state if ".lora_A." in k]:
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            name = module + ".weight"
            if name not in weights:  # transformers 5: CLIPVisionModel has no vision_model.
                name = name.removeprefix("vision_model.")
            weights[name] += scale * state[key.replace("lora_A", "lora_B")] @ state[key]
    ours = llava_tune.load_run(lora_run.run_dir)
    pixels = pixels_of(2)
    with torch.no_grad():
        expected = ours.model.vision(pixels)
        got = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, tower(pixels), atol=1e-4)


# --------------------------------------------------------------------------- full run


def test_full_run_saves_loads_and_exports_the_tower(full_run, tmp_path):
    run = full_run.run_dir
    assert json.loads((run / "COMPLETE").read_text())["parts"] == [
        "projector", "llm_adapter", "vision"]
    assert not (run / "vision_adapter").exists()
    bundle = llava_tune.load_run(run)
    batch = first_batch(bundle, bundle.config)
    torch.testing.assert_close(logits(bundle.model, batch), logits(full_run.model, batch),
                               rtol=1e-5, atol=1e-5)
    pixels = pixels_of(3)
    with torch.no_grad():
        ours = bundle.model.vision(pixels)
        assert not torch.allclose(ours, base_tower(bundle.config)(pixels), atol=1e-4)

    out = export(run, tmp_path / "xt", "xtuner").path
    assert not (out / "visual_encoder_adapter").exists()
    clip = CLIPVisionModel.from_pretrained(out / "visual_encoder").eval()
    with torch.no_grad():
        got = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-5)
    assert all(k.startswith("vision_model.")
               for k in load_file(out / "visual_encoder" / "model.safetensors"))


# --------------------------------------------------------------------------- init_from


def test_init_from_a_vision_lora_run_keeps_training_the_adapter(lora_run, module_overrides,
                                                                shapes_data, tmp_path):
    config = make_config(module_overrides, shapes_data, tmp_path, "again", "train.vision=lora",
                         f"init_from={lora_run.run_dir}")
    bundle, carried = build_for_training(config, device="cpu")
    assert carried == ["projector", "llm_adapter", "vision_adapter"]
    saved = load_file(lora_run.run_dir / "vision_adapter" / "adapter_model.safetensors")
    params = dict(bundle.model.vision.visual.named_parameters())
    for key, value in saved.items():
        param = params[key.replace(".weight", ".default.weight")]
        assert param.requires_grad
        torch.testing.assert_close(param, value, rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in params.items() if "lora_" not in n)


def test_init_from_a_vision_lora_run_into_full_training_merges_it(lora_run, module_overrides,
                                                                  shapes_data, tmp_path):
    config = make_config(module_overrides, shapes_data, tmp_path, "merged", "train.vision=full",
                         f"init_from={lora_run.run_dir}")
    bundle, _ = build_for_training(config, device="cpu")
    assert not isinstance(bundle.model.vision.visual, peft.PeftModel)
    assert all(p.requires_grad for p in bundle.model.vision.parameters())
    pixels = pixels_of(4)
    expected = llava_tune.load_run(lora_run.run_dir).model.vision(pixels)
    with torch.no_grad():
        bundle.model.vision.eval()
        torch.testing.assert_close(bundle.model.vision(pixels), expected, rtol=1e-5, atol=1e-5)
    assert bundle.tower_changed
    parts = save_weights(Path(config.run_dir), bundle.model, bundle, steps=0)
    assert "vision" in parts and "vision_adapter" not in parts


def test_continued_vision_lora_must_keep_its_rank(lora_run, module_overrides, shapes_data,
                                                  tmp_path):
    config = make_config(module_overrides, shapes_data, tmp_path, "rank", "train.vision=lora",
                         f"init_from={lora_run.run_dir}", "train.vision_lora.r=8")
    with pytest.raises(UserError) as err:
        build_for_training(config, device="cpu")
    assert "train.vision_lora.r=4" in str(err.value)


# --------------------------------------------------------------------------- the demo


def test_demo_finetune_config_trains_a_tower_lora(stage_overrides, shapes_data, tmp_path):
    """configs/demo/finetune.yaml as shipped (QLoRA on the 4-bit LM) with train.vision=lora."""
    data = subset(shapes_data / "finetune.json", tmp_path / "finetune8.json", 8)
    code = main(["train", str(DEMO / "finetune.yaml"), *stage_overrides("finetune"),
                 "init_from=null", "train.vision=lora", "train.max_steps=2",
                 "train.batch_size=4", "data.max_length=64", f"data.train={data}"])
    assert code == 0
    run = tmp_path / "run"
    assert (run / "vision_adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((run / "vision_adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (64, 16, 0.05)
    heldout = subset(shapes_data / "heldout.json", tmp_path / "heldout2.json", 2)
    assert main(["eval", str(run), "--data", str(heldout), "--image-folder",
                 str(shapes_data / "images"), "--max-new-tokens", "4"]) == 0


# --------------------------------------------------------------------------- the real recipe


@pytest.mark.parametrize("size", ["1_8b", "7b"])
def test_real_finetune_configs_train_xtuners_tower_lora(size):
    """XTuner's visual_encoder_lora (r=64, alpha=16, dropout 0.05, every Linear) on the
    ViT-L/14-336 tower: PEFT's count of its parameters is the memory estimate's."""
    import estimate_memory

    from llava_tune.assembly.trainable import vision_lora_config
    from llava_tune.convert.open_clip import create_open_clip
    from llava_tune.models.vision import VisionTower
    from llava_tune.stages import vision_mode

    config = load_config(REPO / "configs" / f"internlm2_chat_{size}" / "finetune.yaml")
    assert vision_mode(config) == "lora"
    lora = config.train.vision_lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (64, 16, 0.05, "all-linear")
    assert config.data.group_by_length and config.train.gradient_checkpointing

    visual = create_open_clip(config.model.vision.name, device="meta")
    tower = peft.get_peft_model(VisionTower(visual).visual, vision_lora_config(lora))
    count = sum(p.numel() for n, p in tower.named_parameters() if "lora_" in n)
    assert count == 24 * 64 * (4 * (1024 + 1024) + 2 * (1024 + 4096))
    trainable, activations = estimate_memory.vision_training(config, config.train.batch_size)
    assert trainable == count and activations > 0


def test_hf_llava_export_of_a_positive_feature_layer(lora_run, tmp_path):
    """Our feature_layer p is block p; transformers' hidden_states[p + 1] (embeddings first)."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(lora_run.run_dir, run, ignore=shutil.ignore_patterns("checkpoints"))
    data = yaml.safe_load((run / "config.yaml").read_text())
    data["model"]["vision"]["feature_layer"] = 0
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    out = export(run, tmp_path / "hf", "hf-llava").path
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.vision_feature_layer == 1
    pixels = pixels_of(5)
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        torch.testing.assert_close(hidden[model.config.vision_feature_layer][:, 1:],
                                   llava_tune.load_run(run).model.vision(pixels),
                                   rtol=1e-5, atol=1e-5)
