"""Conversation datasets: records prepared once (data/prepare.py: checked, tokenized, shared
by the processes), images on demand."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from transformers import PreTrainedTokenizerBase

from llava_tune.constants import IMAGE_TOKEN
from llava_tune.data.formats import PREFERENCE
from llava_tune.data.image import ImageProcessor, load_image
from llava_tune.data.prepare import Recipe, prepare, tokenizer_fingerprint, usable_records
from llava_tune.data.report import DataReport, SourceReport, combine
from llava_tune.data.sources import Source, draw
from llava_tune.data.template import ChatTemplate, expand_image_slots
from llava_tune.data.tokenize import IMAGE_CUT, NO_ANSWER, tokenize_record
from llava_tune.data.video import load_video
from llava_tune.errors import UserError
from llava_tune.models.anyres import ImageLayout, Media

__all__ = ["ConversationDataset", "DataReport", "PackedDataset", "pack_groups", "pack_row",
           "sample_item", "tokenizer_fingerprint", "tower_inputs"]


@dataclass
class _Part:
    """One prepared file of a dataset."""

    table: datasets.Dataset
    image_folder: Path | None
    report: DataReport
    built: bool


class ConversationDataset(torch.utils.data.Dataset):
    """Items are {"id", "input_ids" [T], "labels" [T], and "pixel_values" [P, 3, S, S] or
    "image_features" [P, N, Dv] (from a feature cache; P: every item's tiles or frames in
    turn, one per pad image) with "media" [models.anyres.Media] per item, or no image keys}.

    `data` is one file (its images under `image_folder`), or sources (data/sources.py: files,
    their image folders and how many samples each gives). Every file is prepared on its own
    (data/prepare.py: checked and tokenized once, cached under `cache_dir` when given, a file
    that two sources share once); the samples are then an index array into the files' rows
    ([n] int64, drawn by sources.draw, seeded by `seed`), so nothing is copied.

    Each `<image>` becomes as many IMAGE_TOKEN_INDEX slots as `layout` gives that image (the
    tokenizer must know `<image>`: see template.add_image_token); anyres counts them from each
    image's size, read from its header when the records are checked. Records are tokenized once by
    `tokenize.tokenize_record`; what cannot train is dropped and counted in `report` (with a
    line per source for several). Records that fail the checks of `formats.check_record`, or
    whose images are missing, are skipped and counted too; more than `max_bad_fraction` of a
    file's records is an error, since that means a wrong path or format. An image that fails
    to decode later yields {"id", "error"} and the collator leaves that sample out.
    """

    def __init__(
        self,
        data: str | Path | Sequence[Source],
        tokenizer: PreTrainedTokenizerBase,
        template: ChatTemplate,
        max_length: int,
        image_folder: str | Path | None = None,
        image_processor: ImageProcessor | None = None,
        layout: ImageLayout | None = None,
        max_bad_fraction: float = 0.01,
        cache_dir: str | Path | None = None,
        num_proc: int | None = None,
        seed: int = 0,
        preference: bool = False,
    ) -> None:
        if isinstance(data, (str, Path)):
            folder = Path(image_folder) if image_folder is not None else None
            sources = [Source(str(data), (Path(data),), folder)]
        else:
            sources = list(data)
        self.image_processor = image_processor
        self.layout = layout
        self.feature_cache = None
        """Set by the trainer when the vision tower is frozen: a features.FeatureCache."""
        self.preference = preference
        """Items are preference pairs (stage dpo): the files must hold pairs, and only them."""
        self.reference: np.ndarray | None = None
        """[rows of `table`, 2] float32: the reference model's log-probabilities of each
        pair's chosen and rejected answers (set by the trainer: training/preference.py)."""
        self.image_id = tokenizer.get_vocab().get(IMAGE_TOKEN)
        vision = image_processor is not None and layout is not None
        # Each distinct (file, image folder) prepared once, whichever sources name it.
        parts: dict[str, _Part] = {}
        source_parts: list[list[str]] = []
        for source in sources:
            keys = []
            for file in source.files:
                if not Path(file).is_file():
                    raise UserError(f"data file {file} not found; check data.train / --data")
                recipe = Recipe(Path(file), source.image_folder, template, max_length,
                                self.image_id, layout if vision else None,
                                tokenizer_fingerprint(tokenizer))
                key = recipe.key()
                if key not in parts:
                    parts[key] = self._prepare(recipe, tokenizer, max_bad_fraction,
                                               cache_dir, num_proc, preference)
                keys.append(key)
            source_parts.append(keys)
        self.parts = list(parts.values())
        self.part_keys = list(parts)
        """Each prepared file's key (prepare.Recipe.key): what decides its rows."""
        self.prepared_here = any(part.built for part in self.parts)
        """Whether this process prepared a file (else it read the cache)."""
        tables = [part.table for part in self.parts]
        self.table = tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
        """Every file's usable rows, one after the other (memory-mapped); `indices` picks."""
        sizes = [len(table) for table in tables]
        self.starts = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
        """Each file's first row in `table`."""
        if self.image_id is None and any(pc.list_value_length(self.table.data.column("images"))
                                         .to_numpy(zero_copy_only=False)):
            raise ValueError("the tokenizer has no <image> token; call add_image_token first")
        self.table.set_format(columns=["id", "images", "kinds", "image_sizes", "image_tokens",
                                       "input_ids", "labels", "rejected_input_ids",
                                       "rejected_labels"])
        where = {key: index for index, key in enumerate(parts)}
        rows = [np.concatenate([np.arange(self.starts[where[k]], self.starts[where[k]]
                                          + sizes[where[k]]) for k in keys])
                for keys in source_parts]
        drawn = draw(sources, [len(r) for r in rows], seed)
        self.indices = np.concatenate([r[picked] for r, (picked, _) in zip(rows, drawn,
                                                                            strict=True)])
        """[n] int64: the row of `table` each sample reads (a row may come more than once)."""
        self.report = combine([part.report for part in self.parts])
        if len(sources) > 1 or any(s.rule.kind != "all" or len(s.files) > 1 for s in sources):
            self.report.sources = [
                SourceReport(source.name, len(source.files),
                             sum(parts[k].report.total for k in keys),
                             sum(parts[k].report.kept for k in keys), str(source.rule),
                             len(picked), note)
                for source, keys, (picked, note) in zip(sources, source_parts, drawn,
                                                        strict=True)]
        if not len(self.indices):
            raise UserError("no samples drawn from the data's sources (their weights' shares "
                            f"all round to none):\n{self.report.summary()}")

    def _prepare(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase,
                 max_bad_fraction: float, cache_dir: str | Path | None,
                 num_proc: int | None, preference: bool) -> _Part:
        """One file prepared (or read from the cache) and checked: too many bad records, no
        usable sample, or pairs where conversations belong (or the other way round) is an
        error naming the file."""
        prepared = prepare(recipe, tokenizer, cache_dir, num_proc)
        if preference and prepared.format != PREFERENCE:
            raise UserError(
                f"{recipe.file} holds conversations ({prepared.format} format), but stage dpo "
                "trains on preference pairs: records of {\"prompt\", \"chosen\", \"rejected\"} "
                "(TRL's format; with \"images\") or {\"image\", \"question\", \"chosen\", "
                "\"rejected\"} (RLAIF-V's)")
        if not preference and prepared.format == PREFERENCE:
            raise UserError(
                f"{recipe.file} holds preference pairs (chosen/rejected): train them with "
                "stage: dpo (configs/*/dpo.yaml); this stage trains on conversations")
        report = prepared.report
        if prepared.bad and prepared.bad > max_bad_fraction * report.total:
            listed = "\n  ".join(prepared.problems)
            raise UserError(
                f"{prepared.bad} of {report.total} records in {recipe.file} cannot be used:\n"
                f"  {listed}\n(fix these records; up to {max_bad_fraction:.0%} bad records "
                "are skipped automatically: data.max_bad_fraction)"
            )
        if report.kept == 0:
            hint = "(raise data.max_length if samples were cut, or fix the records)"
            if report.skipped.keys() & {IMAGE_CUT, NO_ANSWER}:
                hint = self._length_hint(recipe, tokenizer, recipe.template, recipe.max_length)
            raise UserError(f"no usable samples in {recipe.file}:\n{report.summary()}\n{hint}")
        return _Part(prepared.table, recipe.image_folder, report, prepared.built)

    def _length_hint(self, recipe: Recipe, tokenizer, template: ChatTemplate,
                     max_length: int) -> str:
        """Which data.max_length would fit, from the whole lengths of (up to 1000) samples."""
        records = usable_records(recipe, 1000)
        lengths = []
        for record in records:
            ids = tokenize_record(record, tokenizer, template, 2**62, self.image_id,
                                  record["image_tokens"]).input_ids
            lengths.append(len(ids) + sum(record["image_tokens"]) - len(record["image_tokens"]))
        lengths.sort()
        counts = sorted({n for r in records for n in r["image_tokens"]})
        images = ""
        if counts:
            each = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
            images = f"; each image alone takes {each} tokens"
        span = f"{lengths[0]} to {lengths[-1]}" if lengths[0] < lengths[-1] else f"{lengths[0]}"
        fix = f"Set data.max_length={lengths[-1]} (every sample whole)"
        if lengths[0] < lengths[-1]:
            fix += f", or at least {lengths[0]}"
        return f"data.max_length={max_length} is too small: the samples take {span} tokens{images}. {fix}"

    def __len__(self) -> int:
        return len(self.indices)

    def _identity(self) -> bool:
        """Whether the samples are the table's rows, each once, in order (one file, all)."""
        return len(self.indices) == len(self.table) and bool(
            (self.indices == np.arange(len(self.table))).all())

    def folder_of(self, row: int) -> Path | None:
        """The image folder of `table` row `row` (its file's)."""
        part = 0 if len(self.parts) == 1 else int(np.searchsorted(self.starts, row, "right")) - 1
        return self.parts[part].image_folder

    def lengths(self) -> list[int]:
        """Token counts with images expanded, for batching by length (read from the table's
        column: no sample is decoded)."""
        return self.table.data.column("length").to_numpy()[self.indices].tolist()

    def has_images(self) -> list[bool]:
        """Whether each sample has an image (for batching by modality)."""
        counts = pc.list_value_length(self.table.data.column("images"))
        return (counts.to_numpy(zero_copy_only=False) > 0)[self.indices].tolist()

    def image_paths(self) -> dict[tuple[Path, str], int]:
        """Every distinct (image or video, kind) the samples use, in first-use order, with its
        tower inputs (tiles, frames; 1 for a padded square): from the table's columns, no
        image is opened."""
        if self._identity():
            rows = np.arange(len(self.table))
            columns = [self.table.data.column(name).to_pylist()
                       for name in ("images", "kinds", "image_sizes")]
        else:  # each row once, in the order the samples first use it
            unique, first = np.unique(self.indices, return_index=True)
            rows = unique[np.argsort(first, kind="stable")]
            columns = [self.table.data.column(name).take(rows).to_pylist()
                       for name in ("images", "kinds", "image_sizes")]
        parts = np.searchsorted(self.starts, rows, "right") - 1
        seen: dict[tuple[Path, str], int] = {}
        for part, *row in zip(parts.tolist(), *columns, strict=True):
            folder = self.parts[part].image_folder
            for image, kind, size in zip(*row, strict=True):
                item = (folder / image, kind)
                if item not in seen:
                    frames = self.layout.video_frames if kind == "video" else 0
                    seen[item] = self.layout.inputs(Media(kind, tuple(size), frames))
        return seen

    def tower_inputs(self, path: Path, kind: str) -> torch.Tensor:
        """[P, 3, S, S]: an image's square or tiles, a "square" (one padded square), or a
        video's frames."""
        return tower_inputs(self.image_processor, self.layout, path, kind)

    def __getitem__(self, index: int) -> dict:
        position = int(self.indices[index])
        row = self.table[position]
        folder = self.folder_of(position) if row["images"] else None
        if self.feature_cache is not None:
            cache = self.feature_cache
            item = sample_item(row, self.image_id, self.layout,
                               lambda image, kind: cache.load(folder / image, kind),
                               "image_features")
        else:
            item = sample_item(row, self.image_id, self.layout,
                               lambda image, kind: self.tower_inputs(folder / image, kind))
        if self.preference:
            item["row"] = position
            if self.reference is not None:
                item["reference"] = torch.from_numpy(self.reference[position])
        return item


def tower_inputs(processor: ImageProcessor, layout: ImageLayout, source: Path | BinaryIO,
                 kind: str, name: str | None = None) -> torch.Tensor:
    """[P, 3, S, S]: an image's square or tiles, a "square" (one padded square), or a video's
    frames (a file or folder: `source` is then a path). `name`: what an error calls an open
    file (a .tar shard's member)."""
    if kind == "video":
        return processor.frames(load_video(source, layout.video_frames))
    if kind == "square":
        return processor.square(load_image(source, name))
    return processor(load_image(source, name))


def sample_item(row: dict, image_id: int | None, layout: ImageLayout | None,
                inputs: Callable[[str, str], torch.Tensor], key: str = "pixel_values") -> dict:
    """A training item (ConversationDataset's) from a tokenized row ({"id", "input_ids",
    "labels", "images", "kinds", "image_sizes", "image_tokens"}): the image slots expanded,
    and `inputs(image, kind)` [P, ...] of each image under `key` (pixel_values, or
    image_features from a cache). An image that fails to load gives {"id", "error"}."""
    ids, labels = expand_image_slots(row["input_ids"], row["labels"], image_id,
                                     row["image_tokens"])
    item = {"id": row["id"], "input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if row.get("rejected_input_ids"):  # a preference pair: its rejected sequence too
        ids, labels = expand_image_slots(row["rejected_input_ids"], row["rejected_labels"],
                                         image_id, row["image_tokens"])
        item.update(rejected_input_ids=torch.tensor(ids), rejected_labels=torch.tensor(labels))
    if row["images"]:
        try:
            item[key] = torch.cat([inputs(image, kind)
                                   for image, kind in zip(row["images"], row["kinds"], strict=True)])
        except UserError as err:
            return {"id": row["id"], "error": str(err)}
        item["media"] = [
            Media(kind, tuple(size), layout.video_frames if kind == "video" else 0)
            for kind, size in zip(row["kinds"], row["image_sizes"], strict=True)]
    return item


def pack_groups(lengths: list[int], max_length: int, seed: int) -> list[list[int]]:
    """Samples into rows of at most max_length tokens (a longer sample alone in its row),
    best fit, longest first; the rows in a seeded random order.

    Filling rows in data order closes a row whenever the next sample does not fit: on LLaVA's
    mix of 1-8-turn conversations that left a fifth of every row as padding, which a step
    computes for nothing. Longest first, each into the fullest row it still fits in, the rows
    come out nearly full. A sample's row mates then depend on the lengths, not the data order;
    the loader draws the rows at random.
    """
    rng = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(lengths), generator=rng).tolist()  # ties in a seeded order
    groups: list[list[int]] = []
    room: list[int] = []          # the distinct free spaces of the open rows, ascending
    rows_with: dict[int, list[int]] = {}  # free space -> the open rows that have it
    for index in sorted(shuffled, key=lambda i: -lengths[i]):
        need = lengths[index]
        at = bisect.bisect_left(room, need)
        if at < len(room):  # the fullest open row it fits in
            free = room[at]
            row = rows_with[free].pop()
            if not rows_with[free]:
                del rows_with[free], room[at]
        else:
            row, free = len(groups), max_length
            groups.append([])
        groups[row].append(index)
        free -= need
        if free > 0:
            if free not in rows_with:
                bisect.insort(room, free)
                rows_with[free] = []
            rows_with[free].append(row)
    order = torch.randperm(len(groups), generator=rng).tolist()
    return [groups[k] for k in order]


class PackedDataset(torch.utils.data.Dataset):
    """Several short samples per row, up to max_length tokens, for fewer and fuller batches.

    Items add "position_ids" [T], restarting at 0 for each sample; the collator counts each
    sample's length for attention (models/attention.py), so no token attends across samples.
    A sample whose image fails to load is left out of its row and listed under "skipped".
    """

    def __init__(self, dataset: ConversationDataset, max_length: int, seed: int = 0) -> None:
        self.dataset = dataset
        self.report = dataset.report
        self.groups = pack_groups(dataset.lengths(), max_length, seed)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict:
        return pack_row([self.dataset[i] for i in self.groups[index]])


def pack_row(items: list[dict]) -> dict:
    """One packed row of dataset items, in order: their ids, labels and images concatenated,
    "position_ids" [T] restarting at 0 per sample; an item that failed to load is listed
    under "skipped" (with any "skipped" of the items themselves)."""
    good = [item for item in items if "error" not in item]
    row: dict = {"id": "+".join(item["id"] for item in items),
                 "skipped": [pair for item in items for pair in item.get("skipped", [])]
                 + [(item["id"], item["error"]) for item in items if "error" in item]}
    if not good:
        return {**row, "error": "every sample of this packed row failed to load"}
    row.update(input_ids=torch.cat([item["input_ids"] for item in good]),
               labels=torch.cat([item["labels"] for item in good]),
               position_ids=torch.cat([torch.arange(len(item["input_ids"])) for item in good]))
    for key in ("pixel_values", "image_features"):
        images = [item[key] for item in good if key in item]
        if images:
            row[key] = torch.cat(images)
    media = [m for item in good for m in item.get("media", [])]
    if media:
        row["media"] = media
    return row
