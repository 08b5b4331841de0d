"""The composed model's parts: the merge of image features, the projector, the vision tower."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from llava_tune.constants import IMAGE_TOKEN_INDEX
from llava_tune.convert.open_clip import create_open_clip
from llava_tune.convert.projector import load_projector, save_projector
from llava_tune.errors import UserError
from llava_tune.models.llava import merge_image_features
from llava_tune.models.projector import Projector
from llava_tune.models.vision import VisionTower

# --------------------------------------------------------------------------- merge


def test_merge_puts_features_in_image_slots_in_order():
    torch.manual_seed(0)
    embeds = torch.randn(2, 7, 4)
    x = IMAGE_TOKEN_INDEX
    # Sample 0 holds image 0 (3 slots) after one text token; sample 1 holds image 1 at its end.
    input_ids = torch.tensor([[5, x, x, x, 6, 7, 8],
                              [9, 10, 11, 12, x, x, x]])
    features = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) + 1000
    out = merge_image_features(embeds, input_ids, features)

    assert out.shape == embeds.shape
    torch.testing.assert_close(out[0, 1:4], features[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1, 4:7], features[1], rtol=0, atol=0)
    text = input_ids != IMAGE_TOKEN_INDEX
    torch.testing.assert_close(out[text], embeds[text], rtol=0, atol=0)
    # The input is not modified in place.
    assert not (embeds >= 1000).any()


def test_merge_without_images_returns_embeddings_unchanged():
    embeds = torch.randn(1, 3, 4)
    out = merge_image_features(embeds, torch.tensor([[1, 2, 3]]), None)
    torch.testing.assert_close(out, embeds, rtol=0, atol=0)


def test_merge_casts_features_to_embedding_dtype():
    embeds = torch.zeros(1, 3, 2, dtype=torch.bfloat16)
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 2]])
    out = merge_image_features(embeds, ids, torch.ones(1, 1, 2, dtype=torch.float32))
    assert out.dtype == torch.bfloat16
    assert out[0, 1].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("n_slots,n_images", [(3, 2), (6, 1), (0, 1)])
def test_merge_count_mismatch_names_both_counts(n_slots, n_images):
    embeds = torch.zeros(1, 8, 4)
    ids = torch.ones(1, 8, dtype=torch.long)
    ids[0, :n_slots] = IMAGE_TOKEN_INDEX
    features = torch.zeros(n_images, 3, 4)
    with pytest.raises(ValueError) as err:
        merge_image_features(embeds, ids, features)
    message = str(err.value)
    assert f"{n_slots} image-token" in message
    assert f"{n_images * 3} image features" in message


def test_merge_slots_but_no_images_raises():
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX]])
    with pytest.raises(ValueError, match="2 image-token.*0 image features"):
        merge_image_features(torch.zeros(1, 3, 4), ids, None)


# --------------------------------------------------------------------------- projector


def test_projector_is_linear_gelu_linear_in_xtuner_layout():
    projector = Projector(6, 10)
    layers = list(projector.model)
    assert [type(m) for m in layers] == [nn.Linear, nn.GELU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features) == (6, 10)
    assert (layers[2].in_features, layers[2].out_features) == (10, 10)
    assert set(projector.state_dict()) == {
        "model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"}
    assert sum(p.numel() for p in projector.parameters()) == 6 * 10 + 10 + 10 * 10 + 10

    x = torch.randn(2, 3, 6)
    expected = layers[2](torch.nn.functional.gelu(layers[0](x)))
    torch.testing.assert_close(projector(x), expected)
    assert projector(x).shape == (2, 3, 10)


def test_projector_depth_one_is_a_single_linear():
    projector = Projector(6, 10, depth=1)
    assert set(projector.state_dict()) == {"model.0.weight", "model.0.bias"}


def test_projector_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    projector = Projector(6, 10)
    save_projector(projector, tmp_path / "projector")

    assert sorted(p.name for p in (tmp_path / "projector").iterdir()) == [
        "config.json", "model.safetensors"]
    saved = load_file(tmp_path / "projector" / "model.safetensors")
    assert set(saved) == {"model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"}
    config = json.loads((tmp_path / "projector" / "config.json").read_text())
    assert config == {"vision_hidden_size": 6, "llm_hidden_size": 10, "depth": 2}

    torch.manual_seed(1)
    other = Projector(6, 10)
    x = torch.randn(4, 6)
    assert not torch.allclose(other(x), projector(x))
    load_projector(other, tmp_path / "projector")
    for key, value in projector.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(other(x), projector(x), rtol=0, atol=0)


def test_projector_load_into_other_width_names_both_shapes(tmp_path):
    save_projector(Projector(6, 10), tmp_path / "p")
    # Another LLM width: the first differing tensor is named with both shapes.
    with pytest.raises(UserError, match=r"has shape \(10, 6\), expected \(12, 6\)"):
        load_projector(Projector(6, 12), tmp_path / "p")
    # Another vision width: only model.0.weight differs.
    with pytest.raises(UserError) as err:
        load_projector(Projector(8, 10), tmp_path / "p")
    message = str(err.value)
    assert "model.0.weight" in message
    assert "(10, 6)" in message and "(10, 8)" in message


def test_projector_load_other_depth_or_missing_dir(tmp_path):
    save_projector(Projector(6, 10, depth=1), tmp_path / "p")
    # The fix is named: the depth to set.
    with pytest.raises(UserError, match="has depth 1.*set model.projector_depth=1"):
        load_projector(Projector(6, 10, depth=2), tmp_path / "p")
    with pytest.raises(UserError, match="not found"):
        load_projector(Projector(6, 10), tmp_path / "nothing")


# --------------------------------------------------------------------------- vision tower


@pytest.fixture(scope="module")
def tower(tiny_vision):
    config, weights = tiny_vision
    return VisionTower(create_open_clip("tiny-vit", str(weights), str(config)))


def test_vision_tower_features(tower, tiny_vision):
    assert tower.num_patches == 4
    assert tower.hidden_size == 64
    assert tower.image_size == 32
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32)
    out = tower(pixels)
    assert out.shape == (3, 4, 64)
    assert not out.requires_grad

    # Penultimate block (open_clip's features there: tests/test_vit.py), not the last one.
    torch.testing.assert_close(out, tower.visual(pixels, 1), rtol=0, atol=0)
    assert not torch.allclose(out, tower.visual(pixels, -1))
    # Weights were really loaded from the file (not a fresh random init).
    saved = load_file(tiny_vision[1])
    torch.testing.assert_close(tower.visual.conv1.weight, saved["visual.conv1.weight"],
                               rtol=0, atol=0)
    # Each image is encoded on its own.
    torch.testing.assert_close(tower(pixels[1:2]), out[1:2], rtol=1e-5, atol=1e-5)
    # The blocks after the feature layer do not run (their output would go unread).
    ran = []
    hooks = [block.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
             for k, block in enumerate(tower.base.transformer.resblocks)]
    tower(pixels)
    for hook in hooks:
        hook.remove()
    assert ran == [0, 1] and tower.blocks_run == 2  # of 3 blocks, features from block -2


def test_vision_tower_is_frozen_and_stays_in_eval(tower):
    assert all(not p.requires_grad for p in tower.parameters())
    assert not tower.training
    wrapper = nn.Sequential(tower, nn.Linear(64, 2))
    wrapper.train()
    assert wrapper[1].training
    assert not tower.training
    assert not any(m.training for m in tower.modules())
    pixels = torch.randn(1, 3, 32, 32, requires_grad=True)
    assert not tower(pixels).requires_grad


def test_create_open_clip_errors(tmp_path):
    with pytest.raises(UserError, match="unknown open_clip model 'no-such-vit'"):
        create_open_clip("no-such-vit")
    with pytest.raises(UserError, match="not found"):
        create_open_clip("ViT-B-32", str(tmp_path / "missing.safetensors"))
