"""Conversation datasets: records checked up front, tokenized once (cached), images on demand."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from llava_tune.constants import IMAGE_TOKEN
from llava_tune.data.formats import Problem, read_conversations
from llava_tune.data.image import ImageProcessor, image_size, load_image
from llava_tune.data.segments import ENCODING_VERSION
from llava_tune.data.template import ChatTemplate, expand_image_slots
from llava_tune.data.tokenize import IMAGE_CUT, NO_ANSWER, TRUNCATED, USABLE, tokenize_record
from llava_tune.data.video import load_video
from llava_tune.errors import UserError
from llava_tune.models.anyres import ImageLayout, Media


@dataclass
class DataReport:
    """What was left out of a dataset and why; shown to the user before and after training."""

    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    truncated: int = 0
    scaled_down: int = 0
    """Images larger than the largest anyres grid, scaled down to fit it."""
    largest: tuple[int, int] | None = None
    """That grid's canvas (height, width) in pixels."""

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(example)

    def summary(self) -> str:
        lines = [f"{self.kept} of {self.total} samples kept"]
        if self.truncated:
            lines.append(f"{self.truncated} truncated to max_length")
        if self.scaled_down:
            lines.append(f"{self.scaled_down} images larger than every anyres grid, scaled "
                         f"down to fit one (the largest: {self.largest[1]} x {self.largest[0]} "
                         "px; model.anyres.grid_pinpoints)")
        lines += [f"{count} skipped: {reason}" for reason, count in self.skipped.items()]
        lines += [f"  e.g. {example}" for example in self.examples]
        return "\n".join(lines)


def _digest(value: object) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of everything that decides a tokenizer's ids: its whole serialized form.

    Serializing InternLM2's 92,544-piece tokenizer takes a fraction of a second, once per
    dataset; anything cheaper (a path, a vocab size) would miss an edited tokenizer.
    """
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:24]


class ConversationDataset(torch.utils.data.Dataset):
    """Items are {"id", "input_ids" [T], "labels" [T], and "pixel_values" [P, 3, S, S] or
    "image_features" [P, N, Dv] (from a feature cache; P: every item's tiles or frames in
    turn, one per pad image) with "media" [models.anyres.Media] per item, or no image keys}.

    Each `<image>` becomes as many IMAGE_TOKEN_INDEX slots as `layout` gives that image (the
    tokenizer must know `<image>`: see template.add_image_token); anyres counts them from each
    image's size, read from its header when the records are checked. Records are tokenized once by
    `tokenize.tokenize_record` (cached under `cache_dir` when given); what cannot train is
    dropped and counted in `report`. Records that fail the checks of `formats.check_record`,
    or whose images are missing, are skipped and counted too; more than `max_bad_fraction` of
    them is an error, since that means a wrong path or format. An image that fails to decode
    later yields {"id", "error"} and the collator leaves that sample out.
    """

    def __init__(
        self,
        file: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        template: ChatTemplate,
        max_length: int,
        image_folder: str | Path | None = None,
        image_processor: ImageProcessor | None = None,
        layout: ImageLayout | None = None,
        max_bad_fraction: float = 0.01,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.file = Path(file)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.image_processor = image_processor
        self.layout = layout
        self.feature_cache = None
        """Set by the trainer when the vision tower is frozen: a features.FeatureCache."""
        self.report = DataReport()
        records = self._usable_records(max_bad_fraction)
        self.image_id = tokenizer.get_vocab().get(IMAGE_TOKEN)
        if self.image_id is None and any(r["images"] for r in records):
            raise ValueError("the tokenizer has no <image> token; call add_image_token first")

        def tokenize(record: dict) -> dict:
            out = tokenize_record(record, tokenizer, template, max_length, self.image_id,
                                  record["image_tokens"])
            return {"input_ids": out.input_ids, "labels": out.labels, "status": out.status}

        cache_file = None
        if cache_dir is not None:
            stat = self.file.stat()
            key = hashlib.sha256(repr((
                str(self.file.resolve()), stat.st_size, stat.st_mtime_ns, template, max_length,
                _digest([r["image_tokens"] for r in records]), self.image_id, tokenizer_fingerprint(tokenizer), len(records),
                ENCODING_VERSION,
            )).encode()).hexdigest()[:24]
            os.makedirs(cache_dir, exist_ok=True)
            cache_file = str(Path(cache_dir) / f"tokenized-{key}.arrow")
        table = datasets.Dataset.from_list(records).map(
            tokenize, cache_file_name=cache_file, load_from_cache_file=cache_file is not None,
            desc=f"tokenizing {self.file.name}")
        keep_rows = []
        for row, (status, record_id) in enumerate(zip(table["status"], table["id"], strict=True)):
            if status in USABLE:
                keep_rows.append(row)
                self.report.truncated += status == TRUNCATED
            else:
                self.report.skip(status, f"{self.file} id {record_id!r}: {status}")
        self.table = table.select(keep_rows).remove_columns(["messages", "status"])
        self.table.set_format(columns=["id", "images", "kinds", "image_sizes", "image_tokens",
                                       "input_ids", "labels"])
        self.report.kept = len(self.table)
        if self.report.kept == 0:
            hint = "(raise data.max_length if samples were cut, or fix the records)"
            if self.report.skipped.keys() & {IMAGE_CUT, NO_ANSWER}:
                hint = self._length_hint(records, tokenizer, template, max_length)
            raise UserError(f"no usable samples in {self.file}:\n{self.report.summary()}\n{hint}")

    def _usable_records(self, max_bad_fraction: float) -> list[dict]:
        """The file's records that pass every check; the rest are counted in the report."""
        result = read_conversations(self.file)
        self.report.total = len(result.records) + len(result.problems)
        problems = list(result.problems)
        records = []
        for index, record in zip(result.indices, result.records, strict=True):
            problem = self._image_problem(record)
            if problem:
                problems.append(Problem(self.file, index, record["id"], problem))
            else:
                records.append(record)
        if self.layout is not None and self.layout.anyres:
            self.report.largest = self.layout.largest
        for problem in problems:
            self.report.skip("bad record", str(problem))
        if problems and len(problems) > max_bad_fraction * self.report.total:
            listed = "\n  ".join(str(p) for p in problems[:5])
            raise UserError(
                f"{len(problems)} of {self.report.total} records in {self.file} cannot be used:\n"
                f"  {listed}\n(fix these records; up to {max_bad_fraction:.0%} bad records "
                "are skipped automatically: data.max_bad_fraction)"
            )
        return records

    def _length_hint(self, records: list[dict], tokenizer, template: ChatTemplate,
                     max_length: int) -> str:
        """Which data.max_length would fit, from the whole lengths of (up to 1000) samples."""
        lengths = []
        for record in records[:1000]:
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

    def _image_problem(self, record: dict) -> str | None:
        """Why the record's images (or videos) cannot be used, or None; sets its
        "image_sizes" (anyres images: (height, width) from each header, else (0, 0)) and
        "image_tokens" (slots per item)."""
        record["image_sizes"], record["image_tokens"] = [], []
        if not record["images"]:
            return None
        if self.image_folder is None or self.image_processor is None or self.layout is None:
            return "has an image, but this stage has no vision tower (or no image folder is set)"
        # OneVision reads each of several images as one square (model.anyres.multi_image).
        square = self.layout.kind_of_images(record["kinds"].count("image")) == "square"
        record["kinds"] = ["square" if square and k == "image" else k for k in record["kinds"]]
        for image, kind in zip(record["images"], record["kinds"], strict=True):
            path = self.image_folder / image
            if kind == "video":
                if not path.exists():
                    return (f"video {image!r} not found under image folder "
                            f"{self.image_folder}; check data.image_folder / --image-folder")
                record["image_sizes"].append([0, 0])
                record["image_tokens"].append(self.layout.video_tokens())
                continue
            if not path.is_file():
                return (f"image {image!r} not found under image folder {self.image_folder}; "
                        "check data.image_folder / --image-folder")
            size = (0, 0)
            if kind == "square":
                record["image_sizes"].append([0, 0])
                record["image_tokens"].append(self.layout.tokens(Media("square")))
                continue
            if self.layout.anyres:
                try:
                    size = image_size(path)
                except UserError as err:
                    return str(err)
                self.report.scaled_down += self.layout.scales_down(size)
            record["image_sizes"].append(list(size))
            record["image_tokens"].append(self.layout.num_tokens(size))
        return None

    def __len__(self) -> int:
        return len(self.table)

    def lengths(self) -> list[int]:
        """Token counts with images expanded, for batching by length."""
        return [len(ids) + sum(tokens) - len(tokens)
                for ids, tokens in zip(self.table["input_ids"], self.table["image_tokens"],
                                       strict=True)]

    def has_images(self) -> list[bool]:
        """Whether each sample has an image (for batching by modality)."""
        return [bool(images) for images in self.table["images"]]

    def image_paths(self) -> list[tuple[Path, str]]:
        """Every distinct (image or video, kind) the kept samples use, in first-use order."""
        seen = dict.fromkeys((self.image_folder / image, kind) for images, kinds in
                             zip(self.table["images"], self.table["kinds"], strict=True)
                             for image, kind in zip(images, kinds, strict=True))
        return list(seen)

    def tower_inputs(self, path: Path, kind: str) -> torch.Tensor:
        """[P, 3, S, S]: an image's square or tiles, a "square" (one padded square), or a
        video's frames."""
        if kind == "video":
            return self.image_processor.frames(load_video(path, self.layout.video_frames))
        if kind == "square":
            return self.image_processor.square(load_image(path))
        return self.image_processor(load_image(path))

    def __getitem__(self, index: int) -> dict:
        row = self.table[index]
        ids, labels = expand_image_slots(row["input_ids"], row["labels"], self.image_id,
                                         row["image_tokens"])
        item = {"id": row["id"], "input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if row["images"]:
            paths = [self.image_folder / image for image in row["images"]]
            pairs = list(zip(paths, row["kinds"], strict=True))
            try:
                if self.feature_cache is not None:
                    item["image_features"] = torch.cat(
                        [self.feature_cache.load(p, kind) for p, kind in pairs])
                else:
                    item["pixel_values"] = torch.cat([self.tower_inputs(p, k) for p, k in pairs])
            except UserError as err:
                return {"id": row["id"], "error": str(err)}
            item["media"] = [
                Media(kind, tuple(size), self.layout.video_frames if kind == "video" else 0)
                for kind, size in zip(row["kinds"], row["image_sizes"], strict=True)]
        return item


def pack_groups(lengths: list[int], max_length: int, seed: int) -> list[list[int]]:
    """Greedy packing in a seeded random order: each group's total length <= max_length."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order:
        if current and used + lengths[index] > max_length:
            groups.append(current)
            current, used = [], 0
        current.append(index)
        used += lengths[index]
    if current:
        groups.append(current)
    return groups


class PackedDataset(torch.utils.data.Dataset):
    """Several short samples per row, up to max_length tokens, for fewer and fuller batches.

    Items add "position_ids" [T], restarting at 0 for each sample: the model reads the
    sample boundaries from them (varlen attention with flash-attention, a block-diagonal
    causal mask otherwise), so no token attends across samples. A sample whose image fails
    to load is left out of its row and listed under "skipped".
    """

    def __init__(self, dataset: ConversationDataset, max_length: int, seed: int = 0) -> None:
        self.dataset = dataset
        self.report = dataset.report
        self.groups = pack_groups(dataset.lengths(), max_length, seed)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict:
        items = [self.dataset[i] for i in self.groups[index]]
        good = [item for item in items if "error" not in item]
        row: dict = {"id": "+".join(item["id"] for item in items),
                     "skipped": [(item["id"], item["error"]) for item in items if "error" in item]}
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
