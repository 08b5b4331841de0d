"""Any-resolution geometry and packing against transformers' own LLaVA-NeXT / OneVision code
(an independent implementation of the same recipe)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextModel,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from llava_tune.data.image import ImageProcessor
from llava_tune.models.anyres import ImageLayout, best_resolution, pack_features, unpadded_size

GRIDS = ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1))
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def random_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = [(rng.randint(8, 1200), rng.randint(8, 1200)) for _ in range(n)]
    # Exact ratios and sides equal to the grids' canvases, where rounding decides.
    return sizes + [(112, 448), (448, 112), (112, 112), (224, 224), (448, 448), (336, 1008),
                    (100, 300), (301, 100), (7, 1000)]


def test_grid_choice_and_tile_counts_match_transformers():
    layout = ImageLayout(tile=112, patches=8, grids=GRIDS)
    pinpoints = [list(r) for r in layout.resolutions]
    for size in random_sizes(400):
        assert best_resolution(size, layout.resolutions) == select_best_resolution(size, pinpoints)
        assert layout.grid(size) == tuple(get_anyres_image_grid_shape(size, pinpoints, 112))
        assert layout.num_tiles(size) == image_size_to_num_patches(size, pinpoints, 112)


def test_unpad_matches_transformers():
    for size in random_sizes(400, seed=1):
        for features in ((16, 8), (8, 16), (16, 16), (8, 24), (24, 8), (27, 54)):
            expected = unpad_image(torch.zeros(1, *features), size).shape[1:]
            assert unpadded_size(size, features) == tuple(expected), (size, features)


def hf_pack(model_cls, features, size, layout: ImageLayout, newline, **kwargs):
    """transformers' own pack_image_features of one image, on a stand-in model config."""
    config = SimpleNamespace(image_grid_pinpoints=[list(r) for r in layout.resolutions],
                             vision_config=SimpleNamespace(image_size=layout.tile,
                                                           patch_size=layout.tile // layout.patches))
    packed, lens = model_cls.pack_image_features(SimpleNamespace(config=config), [features],
                                                 torch.tensor([size]), image_newline=newline,
                                                 **kwargs)
    return packed[0]


@pytest.mark.parametrize("size", [(112, 448), (448, 112), (300, 200), (1000, 130), (50, 50)])
def test_pack_features_matches_llava_next(size):
    layout = ImageLayout(tile=112, patches=4, grids=GRIDS)
    torch.manual_seed(0)
    features = torch.randn(layout.num_tiles(size), 16, 6)
    newline = torch.randn(6)
    ours = pack_features(features, size, layout, newline)
    theirs = hf_pack(LlavaNextModel, features, size, layout, newline,
                     vision_feature_select_strategy="default")
    assert ours.shape == (layout.num_tokens(size), 6)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("size", [(112, 448), (900, 900), (1000, 130), (333, 777)])
def test_pooled_pack_matches_onevision(size):
    """OneVision's anyres_max_N: a map over 1.1 N tiles' worth is pooled bilinearly."""
    layout = ImageLayout(tile=112, patches=4, grids=((1, 1), (2, 2), (3, 3), (1, 4)), pool_max=2)
    torch.manual_seed(1)
    features = torch.randn(layout.num_tiles(size), 16, 6)
    newline = torch.randn(6)
    ours = pack_features(features, size, layout, newline)
    theirs = hf_pack(LlavaOnevisionModel, features, size, layout, newline,
                     vision_aspect_ratio="anyres_max_2")
    assert ours.shape == (layout.num_tokens(size), 6)
    torch.testing.assert_close(ours, theirs)


def test_pack_refuses_a_wrong_tile_count():
    layout = ImageLayout(tile=112, patches=4, grids=GRIDS)
    with pytest.raises(ValueError, match="takes 1 x 3 tiles, but 2"):
        pack_features(torch.zeros(3, 16, 6), (100, 400), layout, torch.zeros(6))


@pytest.mark.parametrize("size", [(90, 420), (448, 112), (150, 200), (500, 520)])
def test_tiles_match_llava_next_image_processor(size):
    """Our tiles (overview first, then the grid row by row) are transformers' pixel values."""
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    layout = ImageLayout(tile=112, patches=8, grids=GRIDS)
    ours = ImageProcessor(112, MEAN, STD, layout)(image)
    hf = LlavaNextImageProcessorPil(size={"shortest_edge": 112},
                                    crop_size={"height": 112, "width": 112},
                                    image_grid_pinpoints=[list(r) for r in layout.resolutions],
                                    image_mean=list(MEAN), image_std=list(STD))
    out = hf(images=image, return_tensors="pt")
    assert out["image_sizes"].tolist() == [list(size)]
    assert ours.shape == (layout.num_tiles(size), 3, 112, 112)
    torch.testing.assert_close(ours, out["pixel_values"][0], rtol=0, atol=1e-5)


def test_pad_layout_is_one_square():
    layout = ImageLayout(tile=112, patches=8)
    assert not layout.anyres and layout.num_tiles() == 1 and layout.num_tokens() == 64
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    assert ImageProcessor(112, MEAN, STD, layout)(image).shape == (1, 3, 112, 112)


def test_token_counts_follow_the_aspect_ratio():
    """A wide image keeps its width in tiles and loses the padding's rows: fewer tokens than
    its grid's full map, and each map row ends with a newline."""
    layout = ImageLayout(tile=112, patches=8, grids=GRIDS)
    assert layout.grid((112, 448)) == (1, 3)
    assert layout.feature_map((112, 448)) == (6, 24)  # 8 rows of features, the image fills 6
    assert layout.num_tokens((112, 448)) == 64 + 6 * 25
    assert layout.num_tokens((224, 224)) == 64 + 16 * 17
