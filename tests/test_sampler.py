"""Batches of similar length, image and text-only apart (data.group_by_length)."""

from __future__ import annotations

import random
from pathlib import Path

from llava_tune.config import load_config
from llava_tune.data.sampler import MEGA_BATCH, LengthGroupedSampler
from llava_tune.training import train

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"


def batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def padding(lengths: list[int], groups: list[list[int]]) -> int:
    return sum(max(lengths[i] for i in g) * len(g) - sum(lengths[i] for i in g) for g in groups)


def test_grouped_batches_are_one_modality_and_waste_less_padding():
    rng = random.Random(0)
    n, size = 1000, 8
    lengths = [rng.choice([rng.randint(10, 60), rng.randint(200, 900)]) for _ in range(n)]
    has_images = [rng.random() < 0.66 for _ in range(n)]
    sampler = LengthGroupedSampler(lengths, has_images, size, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(n))  # every sample once
    groups = batches(order, size)
    # Each modality's last, short batch goes to the end, where the loader's slicing may
    # join them: every batch before those is of one modality.
    assert all(len({has_images[i] for i in g}) == 1 for g in groups[:-2])
    assert all(len(g) == size for g in groups[:-2])
    shuffled = list(range(n))
    random.Random(1).shuffle(shuffled)
    assert padding(lengths, groups) < 0.2 * padding(lengths, batches(shuffled, size))
    # Seeded per epoch: the same epoch gives the same order, another epoch another.
    again = LengthGroupedSampler(lengths, has_images, size, seed=0)
    assert list(again) == order
    again.set_epoch(1)
    assert list(again) != order
    assert MEGA_BATCH * size < n  # several mega-batches: the order is not one global sort


def test_training_with_grouped_batches(stage_overrides, shapes_data, tmp_path):
    import json

    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(json.loads((shapes_data / "finetune.json").read_text())[:8]
                                + json.loads((shapes_data / "text.json").read_text())[:8]))
    config = load_config(DEMO / "finetune.yaml", [
        *stage_overrides("finetune"), "init_from=null", f"data.train={mixed}",
        "data.group_by_length=true", "train.batch_size=4", "train.max_steps=4",
        "data.max_length=64"])
    result = train(config)
    assert result.steps == 4 and result.data.kept == 16
