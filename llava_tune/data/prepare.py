"""A conversation file made ready to train, once: its records streamed from the file,
checked, their images looked up and tokenized by several processes, into Arrow files that
every training process memory-maps.

LLaVA-665K is a 1 GB JSON list. Read whole, it holds the text and millions of Python objects
at once (~8 GB), and each of 8 processes would do so and tokenize the same records again. Here
the file is read a chunk at a time (formats.iter_raw_records) into an Arrow file of record
texts; `datasets.map` with `num_proc` workers parses, checks (formats.record_from_raw, the
images: present, their sizes for anyres) and tokenizes them; the usable rows are saved under

    CACHE/prepared-<key>/table/      (Arrow, memory-mapped by every process)
    CACHE/prepared-<key>/report.json (what was kept, skipped and why)

The key digests the data file (path, size, modification time), the image folder, the chat
template, max_length, the tokenizer, the image layout and this module's version: a change to
any of them prepares again. Images are looked up once, when preparing: one that was missing
then is looked up again at the next start (and the file prepared again if it has appeared);
an image replaced in place by one of another size is not seen (touch the data file). The
processes of a launch take turns on a lock: the first prepares, the others wait and map its
files. Without a cache folder the table goes to a temporary folder removed at exit.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from llava_tune.data.formats import (
    FORMATS,
    Problem,
    detect_format,
    iter_raw_records,
    record_from_raw,
)
from llava_tune.data.image import image_size
from llava_tune.data.report import DataReport
from llava_tune.data.segments import ENCODING_VERSION
from llava_tune.data.template import ChatTemplate
from llava_tune.data.tokenize import (
    IMAGE_CUT,
    NO_ANSWER,
    OK,
    TRUNCATED,
    tokenize_pair,
    tokenize_record,
)
from llava_tune.errors import UserError
from llava_tune.files import atomic_dir, exclusive
from llava_tune.models.anyres import ImageLayout, Media

PREPARE_VERSION = 2
"""Bumped when the prepared table's columns or checks change; part of the key."""

BAD_RECORD = "bad record"
ROWS_PER_WORKER = 20_000
"""With data.num_proc unset, a worker per this many records (up to the cores): starting
workers costs seconds, which a small file does not repay."""

MISSING_KEPT = 1000
"""Missing image paths remembered to look up again at the next start."""


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of everything that decides a tokenizer's ids: its whole serialized form.

    Serializing InternLM2's 92,544-piece tokenizer takes a fraction of a second, once per
    dataset; anything cheaper (a path, a vocab size) would miss an edited tokenizer.
    """
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a file's prepared table."""

    file: Path
    image_folder: Path | None
    template: ChatTemplate
    max_length: int
    image_id: int | None
    layout: ImageLayout | None
    """None: a stage without a vision tower (a record with an image is a bad record)."""
    tokenizer_digest: str

    def key(self) -> str:
        stat = self.file.stat()
        folder = str(self.image_folder.resolve()) if self.image_folder is not None else None
        parts = (str(self.file.resolve()), stat.st_size, stat.st_mtime_ns, folder,
                 self.template, self.max_length, self.image_id, self.layout,
                 self.tokenizer_digest, ENCODING_VERSION, PREPARE_VERSION)
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


@dataclass
class Prepared:
    table: datasets.Dataset
    """The usable rows: id, images, kinds, image_sizes, image_tokens, input_ids, labels,
    rejected_input_ids, rejected_labels (pairs), length (tokens with the images expanded)."""
    report: DataReport
    bad: int
    """Records that failed the checks (max_bad_fraction counts these)."""
    problems: list[str]
    """The first five of them, where and what."""
    built: bool = False
    """Whether this process prepared it (else it read another's)."""
    format: str = ""
    """The file's format (formats.FORMATS): preference pairs or conversations."""


# --------------------------------------------------------------------------- one record


def media_problem(record: dict, recipe: Recipe, files: Mapping[str, bytes] | None = None
                  ) -> tuple[str | None, str | None, int]:
    """Check a record's images and videos, setting its "image_sizes" (anyres: (height,
    width) from each header, else (0, 0)), "image_tokens" (slots per item) and kinds
    ("square" for OneVision's several images). Returns (why it cannot be used or None, the
    path of a missing image or None, images scaled down to the largest grid).

    `files`: the images of a .tar shard's sample by name (data/stream.py), looked up there
    instead of under the image folder."""
    record["image_sizes"], record["image_tokens"] = [], []
    if not record["images"]:
        return None, None, 0
    layout, folder = recipe.layout, recipe.image_folder
    if layout is None or (folder is None and files is None):
        return "has an image, but this stage has no vision tower (or no image folder is set)", None, 0
    square = layout.kind_of_images(record["kinds"].count("image")) == "square"
    record["kinds"] = ["square" if square and k == "image" else k for k in record["kinds"]]
    scaled = 0
    for image, kind in zip(record["images"], record["kinds"], strict=True):
        if files is not None:
            problem = _member_problem(image, kind, files)
            if problem:
                return problem, None, 0
        else:
            path = folder / image
            if kind == "video":
                if not path.exists():
                    return (f"video {image!r} not found under image folder {folder}; check "
                            "data.image_folder / --image-folder", str(path), 0)
                record["image_sizes"].append([0, 0])
                record["image_tokens"].append(layout.video_tokens())
                continue
            if not path.is_file():
                return (f"image {image!r} not found under image folder {folder}; check "
                        "data.image_folder / --image-folder", str(path), 0)
        size = (0, 0)
        if kind == "square":
            record["image_sizes"].append([0, 0])
            record["image_tokens"].append(layout.tokens(Media("square")))
            continue
        if layout.anyres:
            try:
                size = (image_size(path) if files is None
                        else image_size(io.BytesIO(files[image]), image))
            except UserError as err:
                return str(err), None, 0
            scaled += layout.scales_down(size)
        record["image_sizes"].append(list(size))
        record["image_tokens"].append(layout.num_tokens(size))
    return None, None, scaled


def _member_problem(image: str, kind: str, files: Mapping[str, bytes]) -> str | None:
    """Why a .tar sample's record cannot use its item `image`, or None."""
    if kind == "video":
        return (f"video {image!r} in a .tar shard: videos are read from files only; put it "
                "beside the shards (or under data.image_folder) and out of the .tar")
    if image not in files:
        return f"image {image!r} is not in its .tar sample (it holds {sorted(files)})"
    return None


def usable_record(raw_text: str, index: int, recipe: Recipe, read_messages
                  ) -> tuple[dict | None, str | None, str | None, int]:
    """(record, problem, missing image, images scaled down) of one record's JSON text."""
    return usable_value(json.loads(raw_text), index, recipe, read_messages)


def usable_value(raw: object, index: int, recipe: Recipe, read_messages,
                 files: Mapping[str, bytes] | None = None
                 ) -> tuple[dict | None, str | None, str | None, int]:
    """usable_record of a record already parsed (a stream's row; `files`: its .tar sample's
    images, see media_problem)."""
    record_id = str(raw["id"]) if isinstance(raw, dict) and "id" in raw else None
    try:
        record = record_from_raw(raw, index, read_messages)
    except ValueError as err:
        return None, str(Problem(recipe.file, index, record_id, str(err))), None, 0
    problem, missing, scaled = media_problem(record, recipe, files)
    if problem:
        return None, str(Problem(recipe.file, index, record["id"], problem)), missing, 0
    return record, None, None, scaled


TABLE_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "images": datasets.Sequence(datasets.Value("string")),
    "kinds": datasets.Sequence(datasets.Value("string")),
    "image_sizes": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
    "image_tokens": datasets.Sequence(datasets.Value("int32")),
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "labels": datasets.Sequence(datasets.Value("int32")),
    # a preference pair's rejected sequence (the chosen one is input_ids); empty otherwise
    "rejected_input_ids": datasets.Sequence(datasets.Value("int32")),
    "rejected_labels": datasets.Sequence(datasets.Value("int32")),
    "length": datasets.Value("int32"),  # tokens with the images expanded (a pair: the longer)
    "truncated": datasets.Value("bool"),
    "scaled": datasets.Value("int32"),  # images scaled down to the largest anyres grid
})
"""The prepared table: usable rows only, so it is map's output itself, never copied."""


def _process(batch: dict[str, list], recipe: Recipe, tokenizer: PreTrainedTokenizerBase,
             format_name: str, fates: str) -> dict[str, list]:
    """datasets.map's batched function: record texts -> the usable rows. What cannot train
    is written, one JSON line each, to a file of this worker's under `fates` (the report is
    built from those: a few lines, where the table would hold a row per record)."""
    read_messages = FORMATS[format_name][1]
    out: dict[str, list] = {name: [] for name in TABLE_FEATURES}
    left_out = []
    for index, text, read_problem in zip(batch["index"], batch["text"], batch["problem"],
                                         strict=True):
        record, missing, scaled = None, None, 0
        if read_problem is not None:
            problem = str(Problem(recipe.file, index, None, read_problem))
        else:
            record, problem, missing, scaled = usable_record(text, index, recipe, read_messages)
        if record is None:
            left_out.append({"index": index, "code": BAD_RECORD, "problem": problem,
                             "missing": missing})
            continue
        rejected = None
        if "rejected" in record:
            tokenized, rejected = tokenize_pair(record, tokenizer, recipe.template,
                                                recipe.max_length, recipe.image_id,
                                                record["image_tokens"])
        else:
            tokenized = tokenize_record(record, tokenizer, recipe.template, recipe.max_length,
                                        recipe.image_id, record["image_tokens"])
        if tokenized.status not in (OK, TRUNCATED):
            left_out.append({"index": index, "code": tokenized.status, "id": record["id"]})
            continue
        tokens = record["image_tokens"]
        for name in ("id", "images", "kinds", "image_sizes", "image_tokens"):
            out[name].append(record[name])
        out["input_ids"].append(tokenized.input_ids)
        out["labels"].append(tokenized.labels)
        out["rejected_input_ids"].append(rejected.input_ids if rejected else [])
        out["rejected_labels"].append(rejected.labels if rejected else [])
        longest = max(len(tokenized.input_ids), len(rejected.input_ids) if rejected else 0)
        out["length"].append(longest + sum(tokens) - len(tokens))
        out["truncated"].append(tokenized.status == TRUNCATED
                                or (rejected is not None and rejected.status == TRUNCATED))
        out["scaled"].append(scaled)
    if left_out:
        with open(Path(fates) / f"{os.getpid()}.jsonl", "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(fate) + "\n" for fate in left_out)
    return out


# --------------------------------------------------------------------------- the file


RAW_FEATURES = datasets.Features({"index": datasets.Value("int64"), "text": datasets.Value("string"),
                                  "problem": datasets.Value("string")})


def _write_raw(recipe: Recipe, path: Path) -> tuple[int, str]:
    """The file's records as texts in an Arrow file at `path`; (records, format name)."""
    from datasets.arrow_writer import ArrowWriter

    first: object = None
    seen_kinds: dict[str, object] = {}
    count = 0
    with ArrowWriter(features=RAW_FEATURES, path=str(path), writer_batch_size=10_000) as writer:
        for raw in iter_raw_records(recipe.file):
            writer.write({"index": raw.index, "text": raw.text, "problem": raw.problem})
            count += 1
            if raw.text is not None and first is None:
                value = json.loads(raw.text)
                if isinstance(value, dict):
                    first = value
                else:
                    seen_kinds.setdefault(type(value).__name__, value)
        writer.finalize()
    # The format is the first object record's; with none, detect_format names what there is.
    examples = [first] if first is not None else list(seen_kinds.values())
    return count, detect_format(recipe.file, examples)


def _workers(records: int, num_proc: int | None) -> int:
    if num_proc is not None:
        return max(1, min(num_proc, records))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, records // ROWS_PER_WORKER))


def _build(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, folder: Path,
           num_proc: int | None) -> None:
    """Prepare the file into `folder`: table/ (map's Arrow files) and report.json."""
    work, fates, table_dir = folder / "work", folder / "work" / "fates", folder / "table"
    fates.mkdir(parents=True)
    table_dir.mkdir()
    total, format_name = _write_raw(recipe, work / "raw.arrow")
    raw = datasets.Dataset.from_file(str(work / "raw.arrow"))
    workers = _workers(total, num_proc)
    processed = raw.map(
        # One worker works in this process: map(num_proc=1) would start a pool of one (and a
        # manager process), 0.15-0.6 s per start measured, more than a small file's own work.
        _process, batched=True, batch_size=1000, num_proc=workers if workers > 1 else None,
        fn_kwargs={"recipe": recipe, "tokenizer": tokenizer, "format_name": format_name,
                   "fates": str(fates)},
        remove_columns=raw.column_names, features=TABLE_FEATURES,
        cache_file_name=str(table_dir / "part.arrow"), new_fingerprint=recipe.key(),
        desc=f"checking and tokenizing {recipe.file.name}")
    files = [Path(f["filename"]).name for f in processed.cache_files]
    anyres = recipe.layout is not None and recipe.layout.anyres
    report = DataReport(total=total, kept=len(processed),
                        truncated=int(processed.data.column("truncated").to_numpy().sum()),
                        scaled_down=int(processed.data.column("scaled").to_numpy().sum()),
                        largest=recipe.layout.largest if anyres else None)
    left_out = sorted((json.loads(line) for file in fates.iterdir()
                       for line in file.read_text(encoding="utf-8").splitlines()),
                      key=lambda fate: fate["index"])
    # Counted as before the table existed: the bad records first, then what cannot train;
    # the examples are the first five of them in that order.
    bad = [fate for fate in left_out if fate["code"] == BAD_RECORD]
    problems = [fate["problem"] for fate in bad[:5]]
    report.skipped[BAD_RECORD] = len(bad)
    report.examples = list(problems)
    for code in (IMAGE_CUT, NO_ANSWER):
        cut = [fate for fate in left_out if fate["code"] == code]
        report.skipped[code] = len(cut)
        report.examples += [f"{recipe.file} id {fate['id']!r}: {code}"
                            for fate in cut[:5 - len(report.examples)]]
    report.skipped = Counter({reason: n for reason, n in report.skipped.items() if n})
    missing = [fate["missing"] for fate in bad if fate["missing"]][:MISSING_KEPT]
    meta = {"report": {**asdict(report), "skipped": dict(report.skipped)}, "bad": len(bad),
            "problems": problems, "missing": missing, "files": files, "format": format_name}
    (folder / "report.json").write_text(json.dumps(meta, indent=1))
    del raw, processed
    shutil.rmtree(work, ignore_errors=True)


def _empty_table() -> datasets.Dataset:
    return datasets.Dataset.from_dict({name: [] for name in TABLE_FEATURES},
                                      features=TABLE_FEATURES)


def _load(folder: Path) -> Prepared | None:
    """The prepared table in `folder`, or None when there is none (or an image that was
    missing has appeared since: prepare again)."""
    meta_file = folder / "report.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    kept = meta["report"]["kept"]
    files = [folder / "table" / name for name in meta["files"]]
    if kept and not all(file.is_file() for file in files):
        return None
    if any(os.path.exists(path) for path in meta["missing"]):
        return None
    fields = meta["report"]
    report = DataReport(**{**fields, "skipped": Counter(fields["skipped"]),
                           "largest": tuple(fields["largest"]) if fields["largest"] else None})
    table = _empty_table()
    if kept:  # map's Arrow files, memory-mapped (a shard per worker)
        table = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
    return Prepared(table, report, meta["bad"], meta["problems"], format=meta["format"])


def prepare(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, cache_dir: str | Path | None,
            num_proc: int | None = None) -> Prepared:
    """The recipe's prepared table: from the cache when it is there, else prepared now (by
    one process at a time; the others then read it)."""
    if cache_dir is None:
        folder = Path(tempfile.mkdtemp(prefix="llava-tune-data-"))
        atexit.register(shutil.rmtree, folder, True)
        _build(recipe, tokenizer, folder / "prepared", num_proc)
        prepared = _load(folder / "prepared")
        assert prepared is not None
        prepared.built = True
        return prepared
    folder = Path(cache_dir) / f"prepared-{recipe.key()}"
    prepared = _load(folder)
    if prepared is not None:
        return prepared
    with exclusive(folder):
        prepared = _load(folder)  # another process may have prepared it meanwhile
        if prepared is None:
            with atomic_dir(folder) as tmp:
                _build(recipe, tokenizer, tmp, num_proc)
            prepared = _load(folder)
            if prepared is not None:
                prepared.built = True
    if prepared is None:
        raise UserError(f"the prepared data in {folder} did not read back; remove the folder "
                        "and start again")
    return prepared


def usable_records(recipe: Recipe, limit: int) -> list[dict]:
    """Up to `limit` records of the file that pass the checks (for error hints), streamed."""
    records: list[dict] = []
    read_messages = None
    for raw in iter_raw_records(recipe.file):
        if raw.text is None:
            continue
        if read_messages is None:
            value = json.loads(raw.text)
            if not isinstance(value, dict):
                continue
            read_messages = FORMATS[detect_format(recipe.file, [value])][1]
        record, _, _, _ = usable_record(raw.text, raw.index, recipe, read_messages)
        if record is not None:
            records.append(record)
            if len(records) >= limit:
                break
    return records
