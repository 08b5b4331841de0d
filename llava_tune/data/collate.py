"""Batches of conversation samples: right padding, images stacked in sample order."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from llava_tune.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_tune.models.anyres import Media


@dataclass
class Batch:
    """A padded batch, ready for `LlavaModel.forward(**batch.model_inputs())`.

    Either `attention_mask` is set (right padding), or `position_ids` is, for packed rows:
    positions restart at 0 per sample, padding forms a block of its own and carries no loss,
    so no attention mask is needed.
    """

    input_ids: torch.Tensor
    """[B, T]"""
    labels: torch.Tensor
    """[B, T], IGNORE_INDEX where there is no loss"""
    attention_mask: torch.Tensor | None = None
    """[B, T], 1 on real tokens"""
    position_ids: torch.Tensor | None = None
    """[B, T], packed rows only"""
    pixel_values: torch.Tensor | None = None
    """[P, 3, S, S], every image of the batch in order of its slots (its tiles in turn)"""
    image_features: torch.Tensor | None = None
    """[P, N, Dv], the tower's features from a feature cache, instead of pixels"""
    media: list[Media] | None = None
    """What each image or video is (its size, its frames), for anyres and videos (it stays
    on the host)"""
    num_tokens: int = 0
    """Real (unpadded) tokens."""
    num_label_tokens: int = 0
    """Tokens that carry a loss (labels after the one-position shift of a causal LM)."""
    sample_lengths: list[int] = field(default_factory=list)
    """Real tokens of each sample, the samples of a packed row apart: attention's cost grows
    with each sample's own length, as packed samples never attend to each other."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(sample id, why) of samples left out because they failed to load."""
    position: tuple[int, int, int, int] | None = None
    """A stream's (reader, epoch, records taken, rows given of a packed window) after this
    batch's last sample: where the stream resumes (data/stream.py)."""
    pairs: int = 0
    """Preference pairs (stage dpo): rows [0, pairs) are the chosen sequences, rows [pairs,
    2 * pairs) the rejected ones in the same order; the images are given once, for the
    chosen rows (the model repeats their tokens). 0: not a preference batch."""
    num_pairs: int = 0
    """The pairs that carry a loss (stand-ins for samples that failed to load do not)."""
    reference: torch.Tensor | None = None
    """[pairs, 2] float32: the reference model's log-probabilities of each pair's chosen and
    rejected answers, when precomputed (dpo.reference=precompute)."""
    rows: list[int] = field(default_factory=list)
    """The dataset table's row of each pair (to store precomputed reference values)."""
    image_slots: int | None = None
    """Positions of input_ids that take an image feature, counted on the host when the
    batch is made: the model checks it against the features without reading the device."""
    segments: tuple[tuple[int, ...], ...] | None = None
    """Packed rows only: per row, the lengths of its samples in order, its padding a segment
    of its own (they sum to T). Attention runs within each (models/attention.py)."""

    _TENSORS = ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values",
                "image_features")

    @property
    def loss_units(self) -> int:
        """What the step's loss is averaged over: label tokens, or preference pairs."""
        return self.num_pairs if self.pairs else self.num_label_tokens

    def model_inputs(self) -> dict[str, torch.Tensor | list]:
        inputs = {name: getattr(self, name) for name in self._TENSORS
                  if getattr(self, name) is not None}
        if self.media is not None:
            inputs["media"] = self.media
        if self.image_slots is not None:
            inputs["image_slots"] = self.image_slots
        if self.segments is not None:
            inputs["segments"] = self.segments
        return inputs

    def pin_memory(self) -> Batch:
        """The batch in page-locked host memory (a DataLoader with pin_memory calls this), so
        its copy to a GPU can run beside the step before."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = False) -> Batch:
        """The batch on `device` (accelerate's data loader calls this)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def _map(self, change) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in (*self._TENSORS, "reference"):
            if moved[name] is not None:
                moved[name] = change(moved[name])
        return Batch(**moved)


@dataclass
class Collator:
    """Pads a list of dataset items into a Batch.

    A sample that failed to load (`{"id", "error"}`) is listed in `skipped` and its place
    taken by a one-token stand-in without loss, so a batch is never empty: with several
    processes, every process must run the same forward and backward passes.
    """

    pad_token_id: int
    preference: bool = False
    """Items are preference pairs (stage dpo): see Batch.pairs."""

    def __call__(self, items: list[dict]) -> Batch:
        skipped = [pair for item in items for pair in item.get("skipped", [])]
        skipped += [(item["id"], item["error"]) for item in items if "error" in item]
        position = items[-1].get("position")
        items = [item for item in items if "error" not in item] or [self._stand_in()]
        if self.preference:
            return self._pairs(items, skipped)
        return self._pad(items, skipped, position)

    def _pad(self, items: list[dict], skipped: list[tuple[str, str]],
             position: tuple[int, int, int, int] | None) -> Batch:
        packed = "position_ids" in items[0]
        length = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        positions = torch.zeros((len(items), length), dtype=torch.long)
        real = 0
        lengths: list[int] = []
        segments: list[tuple[int, ...]] = []
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            mask[row, :n] = 1
            samples = _sample_lengths(item["position_ids"]) if packed else [n]
            if not item.get("stand_in"):
                real += n
                lengths += samples
            if packed:
                positions[row, :n] = item["position_ids"]
                positions[row, n:] = torch.arange(length - n)
                segments.append(tuple(samples) + ((length - n,) if length > n else ()))
        batch = Batch(input_ids=ids, labels=labels, skipped=skipped, position=position,
                      num_tokens=real,
                      num_label_tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()),
                      sample_lengths=lengths,
                      image_slots=int((ids == IMAGE_TOKEN_INDEX).sum()))
        for key in ("pixel_values", "image_features"):
            images = [item[key] for item in items if key in item]
            if images:
                setattr(batch, key, torch.cat(images))
        media = [m for item in items for m in item.get("media", [])]
        if media:
            batch.media = media
        if packed:
            batch.position_ids = positions
            batch.segments = tuple(segments)
        else:
            batch.attention_mask = mask
        return batch

    def _pairs(self, items: list[dict], skipped: list[tuple[str, str]]) -> Batch:
        """A preference batch: the chosen sequences, then the rejected ones (Batch.pairs)."""
        # The images ride on the chosen rows, so _pad gathers them once, in pair order.
        rows = [{key: item[key] for key in ("input_ids", "labels", "stand_in", "pixel_values",
                                            "image_features", "media") if key in item}
                for item in items]
        rows += [{"input_ids": item["rejected_input_ids"], "labels": item["rejected_labels"],
                  "stand_in": item.get("stand_in")} for item in items]
        batch = self._pad(rows, skipped, None)
        batch.pairs = len(items)
        batch.num_pairs = sum(not item.get("stand_in") for item in items)
        if all("reference" in item for item in items):
            batch.reference = torch.stack([item["reference"] for item in items]).float()
        batch.rows = [item.get("row", -1) for item in items]
        return batch

    def _stand_in(self) -> dict:
        item = {"id": "", "input_ids": torch.tensor([self.pad_token_id]),
                "labels": torch.tensor([IGNORE_INDEX]), "stand_in": True}
        if self.preference:
            item.update(rejected_input_ids=item["input_ids"], rejected_labels=item["labels"],
                        reference=torch.zeros(2))
        return item


def _sample_lengths(position_ids: torch.Tensor) -> list[int]:
    """The lengths of a packed row's samples: its positions restart at 0 with each one."""
    starts = (position_ids == 0).nonzero().flatten().tolist() + [len(position_ids)]
    return [end - start for start, end in zip(starts[:-1], starts[1:], strict=True)]
