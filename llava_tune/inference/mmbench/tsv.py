"""MMBench's TSV: rows read up front, images decoded only when asked for."""

from __future__ import annotations

import base64
import binascii
import csv
import io
import os
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from PIL import Image

from llava_tune.errors import UserError

if TYPE_CHECKING:  # the template module pulls in transformers; only its type is needed here
    pass

CIRCULAR_OFFSET = 1_000_000
"""MMBench's circular copies of question i have indexes i + k * CIRCULAR_OFFSET, k >= 1."""

REQUIRED_COLUMNS: tuple[str, ...] = ("index", "question", "A", "B", "image")
MMBENCH_COLUMNS: tuple[str, ...] = (
    "index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image")
"""The columns of MMBench's dev files (test files lack `answer`)."""

OPTION_COLUMNS: tuple[str, ...] = tuple(string.ascii_uppercase)
IMAGE_REF_MAX_CHARS = 64
"""An `image` field this short that holds an integer is another row's `index` (VLMEvalKit)."""

class MMBenchImageError(ValueError):
    """A row's image cannot be decoded; the message names the row."""


# --------------------------------------------------------------------------- the TSV


@dataclass(frozen=True)
class MMBenchRow:
    """One question of an MMBench TSV (its image stays in the file until asked for)."""

    position: int
    """0-based position among the file's data rows."""
    line: int
    """1-based line of the file where the row starts (the header is line 1)."""
    index: int
    question: str
    hint: str | None
    options: dict[str, str]
    """Letter -> option text, in letter order; empty option fields are left out."""
    answer: str | None
    category: str | None
    l2_category: str | None
    fields: dict[str, str]
    """Every column but `image`, as read: the predictions file repeats them."""

    @property
    def group(self) -> int:
        """The question this row belongs to: circular copies share their original's group."""
        return self.index % CIRCULAR_OFFSET

    def where(self) -> str:
        return f"index {self.index} (line {self.line})"


def _records(handle: BinaryIO, first_line: int = 1) -> Iterator[tuple[int, int, list[str]]]:
    """(byte offset, line number, fields) of each TSV record from the handle's position.

    Quoted fields may span lines (pandas quotes fields holding tabs, quotes or newlines). The
    csv reader pulls exactly the lines of one record before returning it, so the first line
    consumed since the last record is where this record starts.
    """
    consumed: list[tuple[int, int]] = []
    line_no = first_line - 1

    def lines() -> Iterator[str]:
        nonlocal line_no
        while True:
            offset = handle.tell()
            raw = handle.readline()
            if not raw:
                return
            line_no += 1
            consumed.append((offset, line_no))
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(
                    f"{getattr(handle, 'name', 'the TSV')} line {line_no} is not UTF-8 text "
                    f"({err.reason}); save the file as UTF-8 (MMBench's TSVs are)") from err
            yield text.removeprefix("\ufeff") if offset == 0 else text

    for fields in csv.reader(lines(), delimiter="\t", quotechar='"', strict=False):
        start = consumed[0]
        consumed.clear()
        if fields:  # a blank line
            yield start[0], start[1], fields


def _integer(text: str) -> int | None:
    text = text.strip()
    if re.fullmatch(r"[+-]?\d+(\.0*)?", text):
        return int(float(text)) if "." in text else int(text)
    return None


def _check_encoded_image(data: str) -> str | None:
    """Why a base64 image field cannot be an image (header check only), or None."""
    try:
        raw = base64.b64decode(data)
    except (binascii.Error, ValueError) as err:
        return f"broken base64 ({err})"
    try:
        with Image.open(io.BytesIO(raw)):
            pass
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"not an image ({type(err).__name__}: {err})"
    return None


class MMBenchTSV:
    """An MMBench TSV: every field but the images in memory, each image decoded when asked.

    Reading checks each image's base64 and format header (cheap); a full decode happens in
    `image`. Rows whose image is already known to be bad are listed in `bad`.
    """

    def __init__(self, path: Path, columns: list[str], rows: list[MMBenchRow],
                 offsets: list[int], image_source: list[int], bad: dict[int, str]) -> None:
        self.path = path
        self.columns = columns
        self.rows = rows
        self._offsets = offsets
        self._image_source = image_source
        self.bad = bad
        """Row position -> why its image cannot be used (found while reading)."""
        self._image_column = columns.index("image")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def option_columns(self) -> list[str]:
        return [c for c in self.columns if c in OPTION_COLUMNS]

    @property
    def has_circular_copies(self) -> bool:
        """Whether the file holds MMBench's own circular copies (some index >= 1e6)."""
        return any(row.index >= CIRCULAR_OFFSET for row in self.rows)

    @property
    def has_answers(self) -> bool:
        return "answer" in self.columns

    def image_source(self, position: int) -> int:
        """The position of the row whose `image` field holds this row's encoded image."""
        return self._image_source[position]

    def image(self, position: int) -> Image.Image:
        """The RGB image of the row at `position`, decoded from the file now.

        Raises MMBenchImageError naming the row when it cannot be decoded.
        """
        row = self.rows[position]
        if position in self.bad:
            raise MMBenchImageError(f"{row.where()}: {self.bad[position]}")
        source = self._image_source[position]
        with open(self.path, "rb") as handle:
            handle.seek(self._offsets[source])
            _, _, fields = next(_records(handle, self.rows[source].line))
        try:
            raw = base64.b64decode(fields[self._image_column].strip())
            with Image.open(io.BytesIO(raw)) as image:
                return image.convert("RGB")  # forces the full decode: truncated data fails here
        except (binascii.Error, OSError, ValueError, SyntaxError,
                Image.DecompressionBombError) as err:
            raise MMBenchImageError(
                f"{row.where()}: image cannot be decoded ({type(err).__name__}: {err})") from err

    @classmethod
    def read(cls, path: str | os.PathLike) -> MMBenchTSV:
        """Index an MMBench TSV; a file that is not one raises UserError saying what is wrong."""
        path = Path(path)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "not found"
            raise UserError(f"MMBench file {path} {what}; pass an MMBench .tsv file")
        # base64 images exceed the csv module's default 128 KiB field limit.
        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
        with open(path, "rb") as handle:
            records = _records(handle)
            header = next(records, None)
            if header is None:
                raise UserError(f"MMBench file {path} is empty; pass an MMBench .tsv file")
            columns = [c.strip() for c in header[2]]
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise UserError(
                    f"{path} is not an MMBench TSV: column(s) {', '.join(missing)} missing "
                    f"(found: {', '.join(columns) or 'none'}). MMBench's tab-separated files "
                    f"have the header {' '.join(MMBENCH_COLUMNS)} (C, D, hint, answer and the "
                    "categories may be absent; more options go in E, F, ...); export the file "
                    "with those columns")
            rows: list[MMBenchRow] = []
            offsets: list[int] = []
            images: list[str | int] = []
            bad: dict[int, str] = {}
            by_index: dict[int, int] = {}
            for offset, line, fields in records:
                if len(fields) > len(columns):
                    raise UserError(
                        f"{path} line {line} has {len(fields)} tab-separated fields but the "
                        f"header has {len(columns)} columns; fix that row (a tab inside a "
                        "field must be quoted)")
                fields = fields + [""] * (len(columns) - len(fields))
                values = dict(zip(columns, fields, strict=True))
                row = _parse_row(path, len(rows), line, values)
                if row.index in by_index:
                    raise UserError(
                        f"{path} line {line}: index {row.index} also on line "
                        f"{rows[by_index[row.index]].line}; every row needs its own index")
                by_index[row.index] = len(rows)
                image_field = values["image"].strip()
                ref = _integer(image_field) if len(image_field) <= IMAGE_REF_MAX_CHARS else None
                if ref is not None:
                    images.append(ref)
                else:
                    images.append("")
                    reason = ("no image" if not image_field
                              else _check_encoded_image(image_field))
                    if reason:
                        bad[len(rows)] = reason
                offsets.append(offset)
                rows.append(row)
        image_source = _resolve_images(rows, images, by_index, bad)
        return cls(path, columns, rows, offsets, image_source, bad)


def _parse_row(path: Path, position: int, line: int, values: dict[str, str]) -> MMBenchRow:
    index = _integer(values["index"])
    if index is None or index < 0:
        raise UserError(f"{path} line {line}: index {values['index']!r} is not a non-negative "
                        "integer; MMBench numbers its rows 0, 1, 2, ...")

    def optional(column: str) -> str | None:
        value = values.get(column, "")
        return value if value.strip() else None

    options = {c: values[c] for c in OPTION_COLUMNS if c in values and values[c].strip()}
    if len(options) < 2:
        raise UserError(f"{path} line {line} (index {index}) has {len(options)} option(s); "
                        "a multiple-choice row needs text in at least columns A and B")
    answer = optional("answer")
    if answer is not None:
        answer = answer.strip()
        if answer not in options:
            raise UserError(f"{path} line {line} (index {index}): answer {answer!r} is not one "
                            f"of its options {', '.join(options)}; fix the answer column")
    fields = {c: v for c, v in values.items() if c != "image"}
    return MMBenchRow(position=position, line=line, index=index, question=values["question"],
                      hint=optional("hint"), options=options, answer=answer,
                      category=optional("category"), l2_category=optional("l2-category"),
                      fields=fields)


def _resolve_images(rows: list[MMBenchRow], images: list[str | int], by_index: dict[int, int],
                    bad: dict[int, str]) -> list[int]:
    """Each row's image source position; rows referring to a missing or bad image go to `bad`."""
    sources: list[int] = []
    for position in range(len(images)):
        seen = {position}
        current = position
        while isinstance(images[current], int):
            target = by_index.get(images[current])
            if target is None:
                bad.setdefault(position, f"image refers to index {images[current]}, "
                                         "which is not in the file")
                break
            if target in seen:
                bad.setdefault(position, "image references form a loop")
                break
            seen.add(target)
            current = target
        if current != position and current in bad and position not in bad:
            bad[position] = f"its image (from index {rows[current].index}) is bad: {bad[current]}"
        sources.append(current)
    return sources


