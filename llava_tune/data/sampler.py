"""Batches of similar length, image and text-only samples apart: less padding without packing.

LLaVA-style data mixes 1-turn and 8-turn conversations, image and text-only records; padding
each random batch to its longest sample wastes much of every step. Like transformers'
LengthGroupedSampler (and LLaVA's group_by_modality_length), samples are shuffled, cut into
mega-batches of many batches, sorted by length inside each, and cut into batches; the batches'
order is shuffled again so that the loss sees no length curriculum.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

MEGA_BATCH = 50
"""Batches per mega-batch (transformers' choice): larger groups more evenly, but a long
stretch of one length range would reach the same optimizer steps."""


class LengthGroupedSampler(Sampler[int]):
    """Indices in an order whose consecutive runs of `batch_size` have similar `lengths` and
    the same modality (`has_images`).

    `batch_size` is the global batch (per-process batch x processes): accelerate hands
    consecutive batches to different processes, so a whole global step stays grouped. Seeded;
    `set_epoch` gives each epoch its own order.
    """

    def __init__(self, lengths: list[int], has_images: list[bool], batch_size: int,
                 seed: int = 0) -> None:
        if len(lengths) != len(has_images):
            raise ValueError("lengths and has_images differ in length")
        self.lengths = lengths
        self.has_images = has_images
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches: list[list[int]] = []
        for modality in (True, False):
            group = [i for i, image in enumerate(self.has_images) if image == modality]
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            mega = self.batch_size * MEGA_BATCH
            for start in range(0, len(order), mega):
                chunk = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])
                batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # A short batch (the tail of a modality) goes last, so every other batch is full.
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        for i in torch.randperm(len(full), generator=generator).tolist():
            yield from full[i]
        for batch in short:
            yield from batch
