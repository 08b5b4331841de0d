"""llava-tune's own CLIP ViT (models/vit.py) against the real open_clip, imported here only:
the same weights, parameters and features, from open_clip's configs and weight files; what it
does not implement is refused by name; and llava-tune's runtime never imports open_clip."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from llava_tune.assembly.model import build_tower
from llava_tune.config import ModelConfig, VisionConfig
from llava_tune.convert.open_clip import create_open_clip
from llava_tune.convert.open_clip_format import open_clip_state_dict, open_clip_vit_config
from llava_tune.errors import UserError
from llava_tune.models.vision import VisionTower
from llava_tune.models.vit import OPENAI_MEAN, OPENAI_STD, ClipViT, build_vit

REPO = Path(__file__).resolve().parents[1]
# ViT-L-14-336-quickgelu's own vision_cfg (24 layers, 1024 wide, 336 px, patch 14) cut to 2
# blocks (a CPU-sized forward of its 577 tokens); a 1-layer text tower, which we never read.
with open(Path(open_clip.__file__).parent / "model_configs" / "ViT-L-14-336-quickgelu.json") as _f:
    VIT_L_336 = json.load(_f)
TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1}
VIT_L_336_CUT = {**VIT_L_336, "vision_cfg": {**VIT_L_336["vision_cfg"], "layers": 2},
                 "text_cfg": TINY_TEXT}
TINY_VISION = {"embed_dim": 32, "text_cfg": TINY_TEXT, "vision_cfg": {
    "image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 16}}
"""conftest's tiny tower (the tiny_vision fixture's config)."""


def open_clip_model(name: str, config: dict | None, folder: Path, seed: int) -> tuple[
        torch.nn.Module, Path | None]:
    """open_clip's CLIP model `name` (random weights drawn after manual_seed(seed)) and the
    config file it was registered from (None for a built-in name)."""
    config_file = None
    if config is not None:
        config_file = folder / f"{name}.json"
        config_file.write_text(json.dumps(config))
        open_clip.add_model_config(config_file)
    torch.manual_seed(seed)
    logging.disable(logging.WARNING)  # "no pretrained weights": meant
    try:
        model = open_clip.create_model(name).eval()
    finally:
        logging.disable(logging.NOTSET)
    return model, config_file


def their_features(visual: torch.nn.Module, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        return visual.forward_intermediates(pixels, indices=[layer], output_fmt="NLC",
                                            intermediates_only=True)["image_intermediates"][0]


def assert_same_parameters(ours: ClipViT, theirs: torch.nn.Module) -> None:
    """Our ViT's weights, in open_clip's layout (q/k/v stacked), equal open_clip's exactly."""
    mine = {k.removeprefix("visual."): v for k, v in open_clip_state_dict(ours).items()}
    expected = theirs.state_dict()
    assert mine.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=0, msg=key)


CASES = {
    # name: (config, or None for open_clip's own file; image side; how the weights are saved)
    "tiny-vit": (TINY_VISION, 32, "safetensors"),
    "ViT-B-32": (None, 224, "pt"),
    "ViT-L-14-336-quickgelu-2": (VIT_L_336_CUT, 336, "ddp"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_features_and_weights_equal_open_clips(name, tmp_path):
    """A weights file saved from open_clip's create_model(...).state_dict() loads into our ViT
    with identical parameters, and its features (block -2, CLS dropped) are open_clip's."""
    config, size, layout = CASES[name]
    model, config_file = open_clip_model(name, config, tmp_path, seed=0)
    state = model.state_dict()
    if layout == "safetensors":
        weights = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, weights)
    elif layout == "pt":
        weights = tmp_path / "weights.pt"
        torch.save(state, weights)
    else:  # a training checkpoint of a DistributedDataParallel model
        weights = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v
                                                               for k, v in state.items()}}, weights)

    ours = create_open_clip(name, str(weights), None if config_file is None else str(config_file))
    assert isinstance(ours, ClipViT) and not ours.training
    assert not any(p.requires_grad for p in ours.parameters())
    assert_same_parameters(ours, model.visual)
    cfg = ours.vit_config
    assert (ours.image_size, ours.grid_size, ours.transformer.width) == (
        size, model.visual.grid_size[0], model.visual.transformer.width)
    assert cfg.quick_gelu == name.endswith("quickgelu-2")
    assert (ours.mean, ours.std) == (tuple(model.visual.preprocess_cfg["mean"]),
                                     tuple(model.visual.preprocess_cfg["std"])) == (
        OPENAI_MEAN, OPENAI_STD)

    pixels = torch.randn(2 if size < 300 else 1, 3, size, size,
                         generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(pixels, -2)
        expected = their_features(model.visual, pixels, -2)
        assert got.shape == (pixels.shape[0], ours.grid_size ** 2, cfg.width)
        print(f"{name}: max |ours - open_clip| = {(got - expected).abs().max().item():.2e} "
              f"(features), {(ours.pooled(pixels) - model.visual(pixels)).abs().max():.2e} "
              "(pooled)")
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # Every block index as open_clip counts them, and the pooled, projected embedding.
        for layer in (0, -1):
            torch.testing.assert_close(ours(pixels, layer), their_features(
                model.visual, pixels, layer), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.pooled(pixels), model.visual(pixels), rtol=1e-5,
                                   atol=1e-5)
    # The tower llava-tune trains with: the same features through VisionTower.
    torch.testing.assert_close(VisionTower(ours)(pixels), expected, rtol=1e-5, atol=1e-5)


def test_random_weights_are_open_clips_draw_for_draw(tmp_path):
    """pretrained=None: after the same seed, the very weights open_clip's create_model gives
    its visual part (so the demo's random tower is what it was when open_clip built it)."""
    model, config_file = open_clip_model("tiny-vit", TINY_VISION, tmp_path, seed=7)
    torch.manual_seed(7)
    assert_same_parameters(create_open_clip("tiny-vit", None, str(config_file)), model.visual)


def test_weights_of_another_resolution_are_resized_as_open_clip_does(tmp_path):
    """open_clip interpolates the positional embedding of weights made for another grid."""
    small, _ = open_clip_model("tiny-vit", TINY_VISION, tmp_path, seed=0)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, weights)
    large = {**TINY_VISION, "vision_cfg": {**TINY_VISION["vision_cfg"], "image_size": 64}}
    config_file = tmp_path / "tiny-vit-64.json"
    config_file.write_text(json.dumps(large))
    open_clip.add_model_config(config_file)
    logging.disable(logging.WARNING)
    try:
        theirs = open_clip.create_model("tiny-vit-64", pretrained=str(weights)).visual.eval()
    finally:
        logging.disable(logging.NOTSET)
    ours = create_open_clip("tiny-vit-64", str(weights), str(config_file))
    assert ours.positional_embedding.shape == (17, 64)
    assert_same_parameters(ours, theirs)
    pixels = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(ours(pixels, -2), their_features(theirs, pixels, -2),
                               rtol=1e-5, atol=1e-5)


def test_weights_of_another_model_or_no_clip_are_user_errors(tmp_path, tiny_vision):
    config_file, weights = tiny_vision
    assert json.loads(config_file.read_text()) == TINY_VISION
    deeper = {**TINY_VISION, "vision_cfg": {**TINY_VISION["vision_cfg"], "layers": 4}}
    (tmp_path / "deeper.json").write_text(json.dumps(deeper))
    with pytest.raises(UserError, match=r"do not fit open_clip model 'deeper' \(16 tower weights "
                       r"missing, e\.g\. visual\.transformer\.resblocks\.3\..*\); set "
                       r"model.vision.name"):
        create_open_clip("deeper", str(weights), str(tmp_path / "deeper.json"))
    wider = {**TINY_VISION, "vision_cfg": {**TINY_VISION["vision_cfg"], "width": 96}}
    (tmp_path / "wider.json").write_text(json.dumps(wider))
    with pytest.raises(UserError, match=r"visual.class_embedding has shape \[64\] in the file, "
                       r"\[96\] in the model"):
        create_open_clip("wider", str(weights), str(tmp_path / "wider.json"))
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "llm.safetensors")
    with pytest.raises(UserError, match="no visual.* tensors"):
        create_open_clip("tiny-vit", str(tmp_path / "llm.safetensors"), str(config_file))
    # A pickle that holds more than tensors and plain containers is never unpickled.
    torch.save({"state_dict": {"visual.proj": torch.zeros(1)}, "loss": torch.nn.MSELoss()},
               tmp_path / "unsafe.pt")
    with pytest.raises(UserError, match="refuses to load it"):
        create_open_clip("tiny-vit", str(tmp_path / "unsafe.pt"), str(config_file))


@pytest.mark.parametrize("field,value", [
    ("ls_init_value", 0.1), ("attentional_pool", True), ("patch_dropout", 0.5),
    ("no_ln_pre", True), ("pos_embed_type", "sin_cos_2d"), ("qk_norm", True),
    ("timm_model_name", "vit_base_patch16_224"), ("act_kwargs", {"approximate": "tanh"}),
    ("pool_type", "avg"), ("block_type", "custom"), ("layers", [3, 4, 6, 3]),
    ("image_size", [32, 48]), ("norm_kwargs", {"elementwise_affine": False}),
    ("no_such_setting", 1),
])
def test_configs_asking_for_what_our_vit_lacks_are_refused_by_field(tmp_path, field, value):
    config = {**TINY_VISION, "vision_cfg": {**TINY_VISION["vision_cfg"], field: value}}
    (tmp_path / "odd.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=rf"open_clip model 'odd': vision_cfg\.{field}"):
        create_open_clip("odd", None, str(tmp_path / "odd.json"))


def test_open_clip_names_and_settings_it_implements(tmp_path):
    """Built-in names read open_clip's own JSON; a timm tower by name is refused; eps and
    a square [h, w] image size are read."""
    config = open_clip_vit_config("ViT-L-14-336-quickgelu")
    assert (config.image_size, config.patch_size, config.width, config.layers, config.heads,
            config.mlp_width, config.output_dim, config.quick_gelu) == (
        336, 14, 1024, 24, 16, 4096, 768, True)
    assert not open_clip_vit_config("ViT-B-32").quick_gelu
    with pytest.raises(UserError, match="vision_cfg.timm_model_name"):
        open_clip_vit_config("ViT-B-16-SigLIP")
    with pytest.raises(UserError, match=r"unknown open_clip model 'ViT-L/14'.*model_configs"):
        open_clip_vit_config("ViT-L/14")
    config = {**TINY_VISION, "vision_cfg": {**TINY_VISION["vision_cfg"], "image_size": [32, 32],
                                            "norm_kwargs": {"eps": 1e-6}, "patch_dropout": 0.0,
                                            "output_tokens": True}}
    (tmp_path / "ok.json").write_text(json.dumps(config))
    ours = open_clip_vit_config("ok", str(tmp_path / "ok.json"))
    assert (ours.image_size, ours.eps) == (32, 1e-6)
    assert build_vit(ours, "cpu").ln_pre.eps == 1e-6


def test_meta_device_builds_shapes_only():
    tower = VisionTower(create_open_clip("ViT-L-14-336-quickgelu", device="meta"))
    assert (tower.num_patches, tower.hidden_size, tower.image_size) == (576, 1024, 336)
    with torch.device("meta"):
        visual = create_open_clip("ViT-L-14-336-quickgelu")
        assert visual.conv1.weight.is_meta
        assert VisionTower(visual)(torch.empty(2, 3, 336, 336)).shape == (2, 576, 1024)


def test_feature_layer_outside_the_tower_is_a_user_error(tiny_vision):
    config_file, weights = tiny_vision
    vision = VisionConfig(name="tiny-vit", pretrained=str(weights), config_file=str(config_file),
                          feature_layer=3)
    with pytest.raises(UserError, match=r"model.vision.feature_layer 3 .* -3..2"):
        build_tower(ModelConfig(vision=vision))


def test_the_package_never_imports_open_clip_or_timm():
    """No module of llava_tune/ imports them, at the top or in a function."""
    found = []
    for path in sorted((REPO / "llava_tune").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(REPO)}: {n}" for n in names
                      if n.split(".")[0] in ("open_clip", "timm")]
    assert found == []


def test_building_and_running_the_tower_leaves_open_clip_out(tiny_vision):
    """In a fresh process, the runtime's modules (train, chat, eval, export, import, the CLI)
    build the tower from an open_clip config and weights file, put a LoRA on it, run it, and
    neither open_clip nor timm is ever imported (their import costs 51 MB a process)."""
    config_file, weights = tiny_vision
    script = textwrap.dedent(f"""
        import json, sys
        import peft, torch
        import llava_tune.cli.commands, llava_tune.training.setup, llava_tune.inference.chat
        import llava_tune.inference.evaluate, llava_tune.export
        import llava_tune.convert.xtuner.importer
        from llava_tune.assembly.model import build_tower
        from llava_tune.assembly.trainable import vision_lora_config
        from llava_tune.config import LoraConfig, ModelConfig, VisionConfig
        tower = build_tower(ModelConfig(vision=VisionConfig(
            name="tiny-vit", pretrained={str(weights)!r}, config_file={str(config_file)!r})))
        tower.visual = peft.get_peft_model(tower.visual, vision_lora_config(LoraConfig(r=2)))
        assert tower(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 64)
        build_tower(ModelConfig(vision=VisionConfig(name="ViT-B-32")))  # by name, random
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("open_clip", "timm"))))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
