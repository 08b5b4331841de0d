"""Batches of conversation samples: right padding, images stacked in sample order."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llava_tune.constants import IGNORE_INDEX


@dataclass
class Collator:
    """Pads a list of dataset items into a batch.

    Returns {"input_ids" [B, T], "labels" [B, T], "pixel_values" [I, 3, S, S] or None (all
    images of the batch, in order), "num_tokens" (real, unpadded), "skipped": list of
    (id, error) for samples whose image failed to load}, plus either "attention_mask" [B, T]
    or, for packed rows, "position_ids" [B, T]: then padding forms a block of its own
    (positions restart at 0) and carries no loss, so no attention mask is needed.
    """

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        skipped = [pair for item in items for pair in item.get("skipped", [])]
        skipped += [(item["id"], item["error"]) for item in items if "error" in item]
        items = [item for item in items if "error" not in item]
        batch: dict = {"skipped": skipped}
        if not items:
            return batch
        packed = "position_ids" in items[0]
        length = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        positions = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            mask[row, :n] = 1
            if packed:
                positions[row, :n] = item["position_ids"]
                positions[row, n:] = torch.arange(length - n)
        images = [item["pixel_values"] for item in items if item["pixel_values"] is not None]
        batch.update(input_ids=ids, labels=labels, num_tokens=int(mask.sum()),
                     pixel_values=torch.cat(images) if images else None)
        if packed:
            batch["position_ids"] = positions
        else:
            batch["attention_mask"] = mask
        return batch
