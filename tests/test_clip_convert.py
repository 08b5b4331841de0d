"""Hugging Face CLIP folders <-> our ViT (open_clip's layout): same features, lossless round
trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from llava_tune.convert.open_clip import (
    create_open_clip,
    hf_clip_vision_state_dict,
    is_hf_clip_dir,
    open_clip_from_hf_dir,
)
from llava_tune.errors import UserError
from llava_tune.models.vision import VisionTower
from llava_tune.models.vit import OPENAI_MEAN, OPENAI_STD

VISION = {"image_size": 32, "patch_size": 16, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 3, "num_attention_heads": 4}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "vocab_size": 49408, "max_position_embeddings": 8}
CUSTOM_MEAN, CUSTOM_STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _penultimate(vision: CLIPVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """What LLaVA feeds its projector: block -2's tokens, CLS dropped. [B, N, W]"""
    with torch.no_grad():
        return vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, tuple[Path, CLIPVisionModel, torch.nn.Module | None]]:
    """Three folders as users hold them: name -> (folder, reference vision model, projection).

    clip: a CLIPModel (text tower, projection 24, QuickGELU) as transformers 5 saves it,
    with a preprocessor_config.json; vision: a CLIPVisionModel with exact GELU (transformers 5
    saves its keys without `vision_model.`); bin: the same tower as the Hub's older files,
    pytorch_model.bin with `vision_model.*` keys and the position_ids buffer.
    """
    root = tmp_path_factory.mktemp("hf_clip")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=24)).eval()
    clip.save_pretrained(root / "clip")
    (root / "clip" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": CUSTOM_MEAN, "image_std": CUSTOM_STD, "crop_size": {"height": 32}}))

    torch.manual_seed(1)
    vision = CLIPVisionModel(CLIPVisionConfig(**VISION, hidden_act="gelu")).eval()
    vision.save_pretrained(root / "vision")

    (root / "bin").mkdir()
    (root / "bin" / "config.json").write_text((root / "vision" / "config.json").read_text())
    old = {f"vision_model.{k}": v for k, v in vision.state_dict().items()}
    old["vision_model.embeddings.position_ids"] = torch.arange(5)[None]
    torch.save(old, root / "bin" / "pytorch_model.bin")
    return {"clip": (root / "clip", clip.vision_model, clip.visual_projection),
            "vision": (root / "vision", vision, None),
            "bin": (root / "bin", vision, None)}


@pytest.mark.parametrize("kind", ["clip", "vision", "bin"])
def test_hf_folder_gives_transformers_features(hf_dirs, kind):
    folder, reference, projection = hf_dirs[kind]
    assert is_hf_clip_dir(folder)
    # The folder's config.json defines the tower; the name is not consulted.
    tower = VisionTower(create_open_clip("any-name", pretrained=str(folder)), feature_layer=-2)
    assert (tower.image_size, tower.num_patches, tower.hidden_size) == (32, 4, 64)
    assert (tower.mean, tower.std) == ((tuple(CUSTOM_MEAN), tuple(CUSTOM_STD)) if kind == "clip"
                                       else (OPENAI_MEAN, OPENAI_STD))
    quick = type(tower.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert quick == (kind == "clip")

    torch.manual_seed(2)
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tower(pixels), _penultimate(reference, pixels),
                               rtol=1e-5, atol=1e-5)
    # The pooled path too: CLS -> post_layernorm (-> visual_projection for a CLIPModel).
    with torch.no_grad():
        expected = reference(pixel_values=pixels).pooler_output
        if projection is not None:
            expected = projection(expected)
        torch.testing.assert_close(tower.visual.pooled(pixels), expected, rtol=1e-5, atol=1e-5)
    assert (tower.visual.proj is None) == (projection is None)


def test_round_trip_is_lossless_and_loads_strictly(hf_dirs, tmp_path):
    folder, reference, _ = hf_dirs["clip"]
    visual = open_clip_from_hf_dir(folder)
    config, state = hf_clip_vision_state_dict(visual)
    assert config.hidden_act == "quick_gelu"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.image_size, config.patch_size) == (
        64, 3, 4, 128, 32, 16)

    # HF -> open_clip -> HF gives back the very tensors it started from.
    original = reference.state_dict()
    assert set(state) == set(original)
    for key, value in original.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)

    model = CLIPVisionModel(config).eval()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.save_pretrained(tmp_path / "exported")
    reloaded = CLIPVisionModel.from_pretrained(tmp_path / "exported").eval()
    pixels = torch.randn(2, 3, 32, 32)
    tower = VisionTower(visual)
    torch.testing.assert_close(_penultimate(reloaded, pixels), tower(pixels), rtol=1e-5, atol=1e-5)


def test_open_clip_tower_exports_to_transformers(tiny_vision):
    """A tower from an open_clip config and weights (GELU) becomes an equivalent
    CLIPVisionModel."""
    config_file, weights = tiny_vision
    tower = VisionTower(create_open_clip("tiny-vit", str(weights), str(config_file)))
    config, state = hf_clip_vision_state_dict(tower.visual)
    assert config.hidden_act == "gelu"
    model = CLIPVisionModel(config).eval()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_penultimate(model, pixels), tower(pixels), rtol=1e-5, atol=1e-5)


def _write(folder: Path, config: dict | None = None, files: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    return folder


def test_folder_in_neither_layout_is_a_user_error(tmp_path):
    empty = _write(tmp_path / "empty")
    llama = _write(tmp_path / "llama", {"model_type": "llama"}, {"model.safetensors": ""})
    for folder, found in ((empty, "no readable config.json"), (llama, "model_type 'llama'")):
        assert not is_hf_clip_dir(folder)
        with pytest.raises(UserError, match="clip_vision_model") as err:
            create_open_clip("ViT-B-32", pretrained=str(folder))
        assert found in str(err.value)
    assert not is_hf_clip_dir(tmp_path / "missing")


def test_missing_weights_and_mismatched_shapes_are_user_errors(hf_dirs, tmp_path):
    vision_config = json.loads((hf_dirs["vision"][0] / "config.json").read_text())
    no_weights = _write(tmp_path / "no_weights", vision_config)
    with pytest.raises(UserError, match=r"expected model.safetensors or pytorch_model.bin.*config"):
        open_clip_from_hf_dir(no_weights)

    # config.json says a wider MLP than the weights hold: the tensor and both shapes are named.
    wide = _write(tmp_path / "wide", {**vision_config, "intermediate_size": 256})
    (wide / "model.safetensors").symlink_to(hf_dirs["vision"][0] / "model.safetensors")
    shapes = r"mlp.fc1.weight has shape \(128, 64\).*expects \(256, 64\)"
    with pytest.raises(UserError, match=shapes):
        open_clip_from_hf_dir(wide)

    # More layers in config.json than in the weights.
    deep = _write(tmp_path / "deep", {**vision_config, "num_hidden_layers": 4})
    (deep / "model.safetensors").symlink_to(hf_dirs["vision"][0] / "model.safetensors")
    with pytest.raises(UserError, match="missing for the 4-layer tower"):
        open_clip_from_hf_dir(deep)
