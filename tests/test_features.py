"""The frozen-feature cache: computed once, reused by later epochs and stages, never changing
results beyond fp16 rounding, and never trusted when stale or damaged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llava_tune.assembly.model import build_tower
from llava_tune.config import load_config
from llava_tune.data.collate import Collator
from llava_tune.data.features import FeatureCache, tower_key
from llava_tune.data.image import ImageProcessor, load_image
from llava_tune.errors import UserError
from llava_tune.training import train
from llava_tune.training.setup import build_dataset, build_for_training, use_feature_cache

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
QUICK = ["train.log_every=1", "train.warmup_ratio=0", "data.max_length=64", "train.batch_size=4",
         "train.max_steps=3"]


@pytest.fixture
def tower_and_processor(stage_overrides):
    config = load_config(DEMO / "pretrain.yaml", stage_overrides("pretrain"))
    tower = build_tower(config.model)
    return tower, ImageProcessor(tower.image_size, tower.mean, tower.std)


def test_entries_hold_the_towers_features_in_fp16(tmp_path, tower_and_processor, shapes_data):
    tower, processor = tower_and_processor
    images = sorted((shapes_data / "images" / "train").glob("*.png"))[:5]
    cache = FeatureCache(tmp_path, tower_key(tower, processor), (tower.num_patches, tower.hidden_size))
    assert cache.fill(images, tower, processor, batch_size=2) == 5
    assert cache.fill(images, tower, processor) == 0  # all there: nothing recomputed
    with torch.no_grad():
        direct = tower(torch.cat([processor(load_image(p)) for p in images]))
    for image, expected in zip(images, direct, strict=True):
        got = cache.load(image)
        assert got.dtype == torch.float16 and got.shape == (1, 4, 64)
        torch.testing.assert_close(got[0].float(), expected, rtol=1e-3, atol=1e-3)  # fp16 rounding


def test_damaged_or_stale_entries_are_recomputed(tmp_path, tower_and_processor, shapes_data):
    tower, processor = tower_and_processor
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    for image, source in zip(images, sorted((shapes_data / "images" / "train").glob("*.png")),
                             strict=False):
        image.write_bytes(source.read_bytes())
    cache = FeatureCache(tmp_path / "cache", tower_key(tower, processor), (4, 64))
    cache.fill(images, tower, processor)
    cache.entry(images[0]).write_bytes(b"garbage")  # damaged
    with pytest.raises(UserError, match="missing or damaged"):
        cache.load(images[0])
    assert not cache.entry(images[0]).exists()  # removed, so the next fill recomputes it
    os.utime(images[1], ns=(1, 1))  # the image changed: its old entry is not found
    assert cache.missing(images) == [(image, "image") for image in images]
    assert cache.fill(images, tower, processor) == 2
    # Other tower weights (or other image processing) are another key: other entries.
    with torch.no_grad():
        next(tower.parameters()).add_(1.0)
    changed_weights = tower_key(tower, processor)
    assert changed_weights != cache.folder.name
    processor.size += 1
    assert tower_key(tower, processor) != changed_weights


def test_cached_training_equals_plain_training(tmp_path, stage_overrides):
    """A pretrain run reading cached fp16 features ends where the run on pixels ends."""
    plain = train(load_config(DEMO / "pretrain.yaml",
                              [*stage_overrides("pretrain", "plain"), *QUICK]))
    cache = tmp_path / "features"
    events = []
    cached = train(load_config(DEMO / "pretrain.yaml", [
        *stage_overrides("pretrain", "cached"), *QUICK, f"data.feature_cache={cache}"]),
        on_event=events.append)
    assert any("image features from" in note and "computed now" in note
               for note in events[0].notes)
    from safetensors.torch import load_file

    a = load_file(plain.run_dir / "projector" / "model.safetensors")
    b = load_file(cached.run_dir / "projector" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-3)
    # A second stage on the same tower and images computes nothing.
    config = load_config(DEMO / "finetune.yaml", [
        *stage_overrides("finetune", "stage2"), *QUICK, f"data.feature_cache={cache}",
        f"init_from={cached.run_dir}"])
    bundle, _ = build_for_training(config, device="cpu")
    dataset = build_dataset(config, bundle, config.data.train)
    notes = use_feature_cache(config, bundle, _single_process(), [dataset])
    assert notes and "(0 computed now)" in notes[0]
    batch = Collator(bundle.tokenizer.pad_token_id)([dataset[i] for i in range(2)])
    assert batch.pixel_values is None and batch.image_features.shape == (2, 4, 64)


def test_a_truncated_entry_is_recomputed_without_reading_the_others(tmp_path,
                                                                    tower_and_processor,
                                                                    shapes_data):
    tower, processor = tower_and_processor
    images = sorted((shapes_data / "images" / "train").glob("*.png"))[:3]
    cache = FeatureCache(tmp_path, tower_key(tower, processor), (tower.num_patches, tower.hidden_size))
    cache.fill(images, tower, processor)
    whole = cache.entry(images[0]).read_bytes()
    cache.entry(images[0]).write_bytes(whole[:-2])  # cut short, as by a full disk
    assert cache.missing(images) == [(images[0], "image")]
    assert cache.bytes_for(1) == 4096  # 4 x 64 fp16 values and a header: one block


def test_a_cache_the_disk_cannot_hold_is_refused(tmp_path, stage_overrides, monkeypatch):
    """Before any feature is computed: the size it needs, the disk's room, the ways out."""
    import shutil

    import llava_tune.training.setup as setup_module

    monkeypatch.setattr(setup_module.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 4096, 4096))
    config = load_config(DEMO / "pretrain.yaml", [
        *stage_overrides("pretrain"), *QUICK, f"data.feature_cache={tmp_path / 'f'}"])
    bundle, _ = build_for_training(config, device="cpu")
    dataset = build_dataset(config, bundle, config.data.train)
    with pytest.raises(UserError, match=r"would take \d+\.\d MB more for \d+ images .* which has "
                       r"0\.0 MB free\): set data.feature_cache=null .* or train on a subset"):
        use_feature_cache(config, bundle, _single_process(), [dataset])
    assert not list((tmp_path / "f").rglob("*.safetensors"))


def test_cache_is_off_while_the_tower_trains(tmp_path, stage_overrides):
    config = load_config(DEMO / "finetune.yaml", [
        *stage_overrides("finetune"), *QUICK, f"data.feature_cache={tmp_path / 'f'}",
        "train.vision=lora", "train.vision_lora.r=4", "init_from=null"])
    bundle, _ = build_for_training(config, device="cpu")
    dataset = build_dataset(config, bundle, config.data.train)
    notes = use_feature_cache(config, bundle, _single_process(), [dataset])
    assert notes == ["data.feature_cache is not used: the vision tower trains (train.vision=lora)"]
    assert dataset.feature_cache is None and not (tmp_path / "f").exists()


def _single_process():
    from accelerate import Accelerator

    return Accelerator(cpu=True)
