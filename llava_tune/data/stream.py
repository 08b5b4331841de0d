"""A folder of shards read as a stream: for data larger than the prepared-data cache.

`data.train: FOLDER` (config.train_is_stream) reads the folder's own files ending in .jsonl
(one record a line), .parquet or .arrow (a row a record, its columns the record's keys) and
.tar (WebDataset: members KEY.json, the record, and its images KEY.jpg, KEY.png, ...).
Records are in any of formats.FORMATS, detected per record, and are checked and tokenized as
they are read by the functions that prepare a data file (prepare.usable_value,
tokenize.tokenize_record), so a record gives the same token ids either way.

The order, for epoch e (`seed` is train.seed):

1. the shards, shuffled by (seed, e), read one after another: record g of that sequence;
2. the sequence split into S = processes x readers slots (a reader: one DataLoader worker, or
   the process itself without workers): slot s = rank x readers + reader takes the records
   with g % S == s, so the slots' shares are disjoint and together are the whole stream;
3. each slot's share through a shuffle buffer of data.shuffle_buffer records, seeded by
   (seed, e, s);
4. each record checked and tokenized (one that cannot train is skipped, and listed in the
   next item's "skipped"); with data.pack, the samples go in windows of PACK_WINDOW, each
   window packed into max_length rows best fit, longest first (datasets.pack_groups: rows
   nearly full, where filling them in arrival order left about a fifth of each as padding),
   its rows in a seeded order.

Every item carries "position" (reader, epoch, records taken from its buffer, rows given of
the window those records start): the loop keeps the last one of each reader
(StreamPosition) and checkpoints it, and a resumed run reads the same sequence again and
passes over that many records without parsing, tokenizing or decoding them (its cost: reading
the shards' bytes up to there in that epoch), then, inside a packed window, over the rows
already given. A reader's epochs follow one another without end; train.max_steps ends the
run.

Every slot reads every shard's bytes and parses only its own records: simple and exact for
any number of shards; splitting by whole shards would read less. Shards must not change
while a run uses them: a resumed run refuses a folder that did (StreamDataset.resume).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedTokenizerBase

from llava_tune.constants import IMAGE_TOKEN
from llava_tune.data.datasets import pack_groups, pack_row, sample_item, tower_inputs
from llava_tune.data.formats import FORMAT_HELP, FORMATS, PREFERENCE, Problem
from llava_tune.data.image import ImageProcessor
from llava_tune.data.prepare import Recipe, usable_value
from llava_tune.data.report import DataReport
from llava_tune.data.template import ChatTemplate
from llava_tune.data.tokenize import USABLE, tokenize_record
from llava_tune.errors import UserError
from llava_tune.models.anyres import ImageLayout

SHARD_SUFFIXES = (".jsonl", ".parquet", ".arrow", ".tar")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
BAD_SHARD = "shard that does not parse"
SHARD_ERRORS = (OSError, ValueError, EOFError, tarfile.TarError, pa.ArrowException)
"""What reading a damaged shard raises (UnicodeDecodeError and JSON errors are ValueErrors)."""
ROWS_PER_READ = 1024
"""Parquet rows read at a time."""
PACK_WINDOW = 256
"""Samples packed together (data.pack). On the bench's LLaVA-like mix (2,000 records of
56-1,024 tokens, shuffled) rows of 1,024 come out 99.0% full in windows of 256 (97.3% of 64,
99.3% of 512), against 78.1% filled in arrival order; few enough samples to hold (their
tokens and, from .tar shards, image bytes)."""


def stream_shards(folder: str | Path) -> list[Path]:
    """The shards of a stream folder, sorted by name: its own files (not its subfolders')
    ending in SHARD_SUFFIXES. None is a UserError naming what a shard is."""
    folder = Path(folder)
    shards = sorted(p for p in folder.iterdir() if p.suffix in SHARD_SUFFIXES and p.is_file())
    if not shards:
        raise UserError(f"data.train {folder} is a folder with no shards in it: a stream reads "
                        f"the folder's {', '.join('*' + s for s in SHARD_SUFFIXES)} files (JSON "
                        "lists: write them as JSONL, one record a line)")
    return shards


# --------------------------------------------------------------------------- reading shards


@dataclass
class Raw:
    """One record of a shard as read, before it is parsed (cheap to pass over on resume)."""

    shard: Path
    index: int
    """The record's position in its shard (a .tar's samples counted in order)."""
    value: str | dict | None
    """The record's JSON text (JSONL, .tar) or its row (Parquet, Arrow); None with a problem."""
    problem: str | None = None
    line: int | None = None
    """JSONL: the record's line in its shard (for error messages)."""
    members: Mapping[str, bytes] | None = None
    """.tar: the sample's image files by member name, read when asked for."""


class _Seen:
    """Records a shard reader has gone past (its own and the other slots'), kept when it fails."""

    n = 0


class _Members(Mapping[str, bytes]):
    """A .tar sample's image members, each read from the shard when asked for (a shuffle
    buffer of samples holds their places, not their bytes)."""

    def __init__(self, shard: Path, spans: dict[str, tuple[int, int]]) -> None:
        self.shard = shard
        self.spans = spans
        """member name -> (offset of its data in the shard, size)"""

    def __getitem__(self, name: str) -> bytes:
        offset, size = self.spans[name]
        with open(self.shard, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    def __iter__(self) -> Iterator[str]:
        return iter(self.spans)

    def __len__(self) -> int:
        return len(self.spans)


Reader = Callable[[Path, int, int, int, _Seen], Iterator[Raw]]
"""(shard, global index of its first record, slot, slots, counter) -> the slot's records."""


def _read_jsonl(shard: Path, base: int, slot: int, slots: int, seen: _Seen) -> Iterator[Raw]:
    with open(shard, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            index = seen.n
            seen.n += 1
            if (base + index) % slots != slot:
                continue
            try:
                text = line.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield Raw(shard, index, None, f"line {number} is not UTF-8 text (byte "
                          f"{err.start} of the line); save the shard as UTF-8", number)
                continue
            yield Raw(shard, index, text, line=number)


def _row(value: dict) -> dict:
    """A table row as a record: a null column is a key the record does not have."""
    return {key: v for key, v in value.items() if v is not None}


def _read_batches(shard: Path, batches: Iterator[pa.RecordBatch], base: int, slot: int,
                  slots: int, seen: _Seen) -> Iterator[Raw]:
    for batch in batches:
        start = seen.n
        seen.n += batch.num_rows
        rows = list(range((slot - base - start) % slots, batch.num_rows, slots))
        if rows:  # only this slot's rows become Python objects
            for row, value in zip(rows, batch.take(pa.array(rows)).to_pylist(), strict=True):
                yield Raw(shard, start + row, _row(value))


def _read_parquet(shard: Path, base: int, slot: int, slots: int, seen: _Seen) -> Iterator[Raw]:
    batches = pq.ParquetFile(shard, memory_map=True).iter_batches(batch_size=ROWS_PER_READ)
    yield from _read_batches(shard, batches, base, slot, slots, seen)


def _arrow_batches(shard: Path) -> Iterator[pa.RecordBatch]:
    """An Arrow IPC file's record batches, memory-mapped: the file format, or the stream
    format that `datasets` writes."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(shard)))
    except pa.ArrowInvalid:
        yield from pa.ipc.open_stream(pa.memory_map(str(shard)))
        return
    for i in range(reader.num_record_batches):
        yield reader.get_batch(i)


def _read_arrow(shard: Path, base: int, slot: int, slots: int, seen: _Seen) -> Iterator[Raw]:
    yield from _read_batches(shard, _arrow_batches(shard), base, slot, slots, seen)


def _tar_key(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension) of a member: "a/0001.0.png" -> ("a/0001", "0.png")."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


def _tar_samples(shard: Path) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) of a .tar shard's samples: consecutive members sharing a
    key. Only the headers are read."""
    with tarfile.open(shard, "r:") as tar:
        key, members = None, {}
        while (member := tar.next()) is not None:
            tar.members = []  # tarfile keeps every header it read; a shard may hold millions
            if not member.isfile():
                continue
            name_key, extension = _tar_key(member.name)
            if name_key != key and members:
                yield key, members
                members = {}
            key = name_key
            members[extension] = member
        if members:
            yield key, members


def _read_tar(shard: Path, base: int, slot: int, slots: int, seen: _Seen) -> Iterator[Raw]:
    with open(shard, "rb") as handle:
        for key, members in _tar_samples(shard):
            index = seen.n
            seen.n += 1
            if (base + index) % slots != slot:
                continue
            images = {m.name: (m.offset_data, m.size) for m in sorted(
                members.values(), key=lambda m: m.name) if m.name.lower().endswith(IMAGE_SUFFIXES)}
            record = members.get("json")
            if record is None:
                yield Raw(shard, index, None, f"sample {key!r} has no {key}.json record (it "
                          f"holds {sorted(members)})")
                continue
            handle.seek(record.offset_data)
            text = handle.read(record.size).decode("utf-8-sig")
            yield Raw(shard, index, text, members=_Members(shard, images) if images else None)


READERS: dict[str, Reader] = {".jsonl": _read_jsonl, ".parquet": _read_parquet,
                              ".arrow": _read_arrow, ".tar": _read_tar}


def _owned(shards: list[Path], slot: int, slots: int) -> Iterator[Raw]:
    """The records of `shards`, read in that order, that belong to `slot` of `slots`.

    A shard that fails to read is left from there on: one Raw with the problem takes the
    next place in the sequence (so one slot reports it), and the next shard follows."""
    base = 0
    for shard in shards:
        seen = _Seen()
        try:
            yield from READERS[shard.suffix](shard, base, slot, slots, seen)
        except Exception as err:  # not `except SHARD_ERRORS`: a generator closed at the
            # interpreter's exit would look that name up in a module already torn down
            if not isinstance(err, SHARD_ERRORS):
                raise
            if (base + seen.n) % slots == slot:
                after = f" after {seen.n} records" if seen.n else ""
                yield Raw(shard, seen.n, None, f"{BAD_SHARD}{after} ({type(err).__name__}: "
                          f"{err}); the rest of it is skipped: replace or remove the shard")
            seen.n += 1
        base += seen.n


def shuffled(items: Iterator[Raw], size: int, rng: random.Random) -> Iterator[Raw]:
    """A shuffle buffer: each item out is drawn at random from the next `size` in."""
    buffer: list[Raw] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


# --------------------------------------------------------------------------- counting


@dataclass
class StreamReport(DataReport):
    """What is known of a stream before it is read: its shards and records (counted from
    the Parquet and Arrow metadata, and JSONL lines and .tar samples until there are enough
    for the run), shards that do not open. Records that cannot train are skipped, and
    reported, as the stream reaches them."""

    folder: Path | None = None
    shards: Counter = field(default_factory=Counter)
    """Shards per suffix."""
    complete: bool = True
    """Whether every shard was counted (else `total` is a lower bound)."""

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {suffix[1:]}" for suffix, n in sorted(self.shards.items()))
        count = f"{self.total:,} records" if self.complete else (
            f"at least {self.total:,} records (counted until there were enough for the run)")
        lines = [f"stream of {sum(self.shards.values())} shards in {self.folder} ({kinds}): "
                 f"{count}; records are checked and tokenized as they are read, those that "
                 "cannot train skipped and listed as they come"]
        lines += [f"{count} skipped: {reason}" for reason, count in self.skipped.items()]
        lines += [f"  e.g. {example}" for example in self.examples]
        return "\n".join(lines)


def _count(shard: Path, limit: int) -> int:
    """Records in a shard: from the metadata (Parquet, Arrow), or lines and samples read up
    to `limit`. Raises SHARD_ERRORS for a shard that does not open."""
    if shard.suffix == ".parquet":
        return pq.ParquetFile(shard).metadata.num_rows
    if shard.suffix == ".arrow":
        return sum(batch.num_rows for batch in _arrow_batches(shard))
    count = 0
    if shard.suffix == ".jsonl":
        with open(shard, "rb") as handle:
            for line in handle:
                count += bool(line.strip())
                if count >= limit:
                    break
        return count
    for _, members in _tar_samples(shard):
        count += "json" in members
        if count >= limit:
            break
    return count


def count_records(folder: Path, shards: list[Path], wanted: int) -> StreamReport:
    """A StreamReport of the shards: every Parquet and Arrow shard opened (their row counts
    are metadata), JSONL and .tar shards counted until `wanted` records are found."""
    report = StreamReport(folder=folder, shards=Counter(s.suffix for s in shards))
    for shard in sorted(shards, key=lambda s: s.suffix not in (".parquet", ".arrow")):
        if report.total >= wanted and shard.suffix in (".jsonl", ".tar"):
            report.complete = False
            continue
        try:
            report.total += _count(shard, wanted - report.total)
        except SHARD_ERRORS as err:
            report.skip(BAD_SHARD, f"{shard}: {type(err).__name__}: {err}")
    return report


# --------------------------------------------------------------------------- the dataset


@dataclass
class StreamPosition:
    """Where one process is in its stream: for each of its readers (DataLoader workers, or
    one), the epoch, the records taken from its shuffle buffer in that epoch and, packed, the
    rows given of the window that starts there; and the reader whose batch comes next (the
    DataLoader takes the workers' batches in turn)."""

    readers: list[tuple[int, int, int]]
    next_reader: int = 0

    @classmethod
    def start(cls, readers: int) -> StreamPosition:
        return cls([(0, 0, 0)] * readers)

    def advance(self, position: tuple[int, int, int, int]) -> None:
        """After a batch whose last item had `position` (reader, epoch, records taken, rows
        given of the window)."""
        reader, *where = position
        self.readers[reader] = tuple(where)
        self.next_reader = (reader + 1) % len(self.readers)

    @property
    def epoch(self) -> int:
        """The newest epoch any reader is in."""
        return max(epoch for epoch, _, _ in self.readers)

    def as_list(self) -> list[int]:
        """[next reader, epoch 0, taken 0, rows 0, epoch 1, ...]: a fixed-length row of ints,
        for gathering the processes' positions into a checkpoint."""
        return [self.next_reader] + [n for where in self.readers for n in where]

    @classmethod
    def from_list(cls, values: list[int], readers: int | None = None) -> StreamPosition:
        """The inverse of as_list; given `readers`, also a checkpoint's row from before packed
        windows ([next reader, epoch, taken, ...]: no rows given)."""
        if readers is not None and len(values) == 1 + 2 * readers:
            return cls([(values[i], values[i + 1], 0) for i in range(1, len(values), 2)],
                       values[0])
        return cls([tuple(values[i:i + 3]) for i in range(1, len(values), 3)], values[0])


@dataclass
class _Sample:
    """A record checked and tokenized, its images not loaded yet."""

    row: dict
    """prepare's table row: id, images, kinds, image_sizes, image_tokens, input_ids, labels."""
    length: int
    """Tokens with the images expanded."""
    members: Mapping[str, bytes] | None
    shard: Path


class StreamDataset(torch.utils.data.IterableDataset):
    """The items of ConversationDataset (or PackedDataset's rows with `pack`), read from a
    folder of shards as the module docstring says, each with "position" (reader, epoch,
    records taken, rows given of a packed window) and "skipped" [(id, why)] of the records
    left out before it.

    This process's share: `rank` of `world` processes, each with `readers` DataLoader workers
    (0 or 1: none). Iterating never ends (epoch follows epoch); `iter_epoch` gives one.
    """

    def __init__(
        self,
        folder: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        template: ChatTemplate,
        max_length: int,
        *,
        image_folder: str | Path | None = None,
        image_processor: ImageProcessor | None = None,
        layout: ImageLayout | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        pack: bool = False,
        rank: int = 0,
        world: int = 1,
        readers: int = 1,
        wanted: int = 0,
    ) -> None:
        self.folder = Path(folder)
        self.shards = stream_shards(self.folder)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.image_processor = image_processor
        self.layout = layout
        self.image_id = tokenizer.get_vocab().get(IMAGE_TOKEN)
        vision = image_processor is not None and layout is not None
        # Images named by path are under data.image_folder, or beside the shards.
        self.recipe = Recipe(self.folder, Path(image_folder or self.folder), template,
                             max_length, self.image_id, layout if vision else None, "")
        self.seed, self.buffer, self.pack = seed, shuffle_buffer, pack
        self.rank, self.world, self.readers = rank, world, max(1, readers)
        self.report = count_records(self.folder, self.shards, max(wanted, self.slots))
        if self.report.complete and self.report.total < self.slots:
            raise UserError(
                f"the stream in {self.folder} holds {self.report.total} records, fewer than its "
                f"{self.slots} readers ({world} processes x {self.readers} per process, "
                "data.num_workers): each reader needs records of its own; add shards or use "
                "fewer processes or workers")
        self.start = StreamPosition.start(self.readers)
        """Where iteration starts (a checkpoint's position: resume)."""
        self._key = self._digest()

    @property
    def slots(self) -> int:
        return self.world * self.readers

    def key(self) -> str:
        """A digest of what decides the sequence: the shards (names, sizes, modification
        times, as the run found them) and the stream's settings. A resumed run must find the
        same."""
        return self._key

    def _digest(self) -> str:
        shards = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in self.shards]
        parts = (shards, self.seed, self.buffer, self.pack, self.max_length)
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]

    def resume(self, state: dict) -> None:
        """Start where a checkpoint's stream state (loop's _checkpoint: every process's
        StreamPosition) says this process was; refuse a state this stream cannot continue."""
        if state["key"] != self.key():
            raise UserError(
                f"the stream in {self.folder} is not the one the checkpoint read: its shards "
                "(names, sizes, modification times) or data.shuffle_buffer, data.pack, "
                "data.max_length or train.seed changed. An exact resume needs them as they "
                "were; start again with --overwrite to train on them as they are")
        if (state["processes"], state["readers"]) != (self.world, self.readers):
            raise UserError(
                f"the checkpoint read the stream with {state['processes']} processes x "
                f"{state['readers']} readers each (data.num_workers, 0 counting as 1), this run "
                f"has {self.world} x {self.readers}: resume with the same (the sequence of "
                "samples depends on them)")
        self.start = StreamPosition.from_list(state["positions"][self.rank], self.readers)

    # ------------------------------------------------------------------ the sequence

    def shard_order(self, epoch: int) -> list[Path]:
        order = list(self.shards)
        random.Random(f"llava-tune stream shards {self.seed} {epoch}").shuffle(order)
        return order

    def _taken(self, epoch: int, slot: int) -> Iterator[Raw]:
        """A slot's records of an epoch in the order they leave the shuffle buffer."""
        rng = random.Random(f"llava-tune stream buffer {self.seed} {epoch} {slot}")
        return shuffled(_owned(self.shard_order(epoch), slot, self.slots), self.buffer, rng)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if workers != self.readers:
            raise RuntimeError(f"StreamDataset built for {self.readers} readers, read by "
                               f"{workers}")
        # The DataLoader takes its workers' batches in turn from worker 0: worker 0 plays the
        # reader whose batch was due when the checkpoint was written.
        reader = (worker + self.start.next_reader) % self.readers
        epoch, taken, rows = self.start.readers[reader]
        carried: list[tuple[str, str]] = []
        while True:
            produced, carried = yield from self.iter_epoch(epoch, reader, taken, carried, rows)
            if not produced and not taken:
                raise UserError(
                    f"reader {reader} of process {self.rank} found no usable record in its "
                    f"share of epoch {epoch} of the stream in {self.folder}: "
                    + "; ".join(why for _, why in carried[:3]))
            epoch, taken, rows = epoch + 1, 0, 0

    def iter_epoch(self, epoch: int, reader: int = 0, skip: int = 0,
                   carried: list[tuple[str, str]] = (), rows_given: int = 0
                   ) -> Generator[dict, None, tuple[int, list[tuple[str, str]]]]:
        """One epoch's items of `reader` of this process, after passing over its first `skip`
        records (unparsed) and, packed, the first `rows_given` rows of the window they start;
        `carried`: skipped records of the epoch before, reported with the first item. Returns
        (as a generator's value) how many items it gave and the records it skipped after its
        last item."""
        slot = self.rank * self.readers + reader
        produced = 0
        # (record taken, (id, why)): the records left out since the last item
        skipped: list[tuple[int, tuple[str, str]]] = [(-1, pair) for pair in carried]
        window: list[tuple[int, _Sample]] = []  # (record taken, sample) of the packed window
        start = skip  # the records taken before the window
        for taken, raw in enumerate(self._taken(epoch, slot)):
            if taken < skip:
                continue  # resuming: passed over unparsed
            sample, problem = self._sample(raw)
            if sample is None:
                skipped.append((taken, problem))
                continue
            if not self.pack:
                produced += 1
                yield self._item(sample, (reader, epoch, taken + 1, 0),
                                 [p for _, p in skipped])
                skipped = []
                continue
            window.append((taken, sample))
            if len(window) == PACK_WINDOW:
                produced += yield from self._window(window, reader, epoch, start, skipped,
                                                    rows_given)
                start, rows_given = window[-1][0] + 1, 0
                skipped = [(n, p) for n, p in skipped if n > window[-1][0]]
                window = []
        if window:
            produced += yield from self._window(window, reader, epoch, start, skipped,
                                                rows_given)
            skipped = [(n, p) for n, p in skipped if n > window[-1][0]]
        return produced, [p for _, p in skipped]

    def _window(self, window: list[tuple[int, _Sample]], reader: int, epoch: int, start: int,
                skipped: list[tuple[int, tuple[str, str]]], rows_given: int
                ) -> Generator[dict, None, int]:
        """A window's samples packed into rows (best fit, seeded by where the window starts),
        from row `rows_given` on; returns how many it gave. The first row reports the records
        skipped before the window's last sample; the last row's position is past the window,
        the others' the window's start and the rows given."""
        slot = self.rank * self.readers + reader
        seed = random.Random(f"llava-tune stream pack {self.seed} {epoch} {slot} {start}"
                             ).getrandbits(31)
        groups = pack_groups([sample.length for _, sample in window], self.max_length, seed)
        last = window[-1][0]
        reported = [p for n, p in skipped if n < last]
        for index in range(rows_given, len(groups)):
            out = pack_row([self._item(window[i][1], None, []) for i in groups[index]])
            out["skipped"] = (reported if index == 0 else []) + out["skipped"]
            out["position"] = ((reader, epoch, last + 1, 0) if index == len(groups) - 1
                               else (reader, epoch, start, index + 1))
            yield out
        return len(groups) - rows_given

    def _item(self, sample: _Sample, position: tuple[int, int, int, int] | None,
              skipped: list[tuple[str, str]]) -> dict:
        """The sample's training item, its images loaded now."""
        members = sample.members
        if members is not None:
            def inputs(image: str, kind: str) -> torch.Tensor:
                return tower_inputs(self.image_processor, self.layout,
                                    io.BytesIO(members[image]), kind,
                                    f"{sample.shard}:{image}")
        else:
            def inputs(image: str, kind: str) -> torch.Tensor:
                return tower_inputs(self.image_processor, self.layout,
                                    self.recipe.image_folder / image, kind)
        item = sample_item(sample.row, self.image_id, self.layout, inputs)
        item["skipped"] = skipped
        if position is not None:
            item["position"] = position
        return item

    def _sample(self, raw: Raw) -> tuple[_Sample | None, tuple[str, str] | None]:
        """The record checked and tokenized, or (None, (where, why it cannot train))."""
        where = f"{raw.shard.name}:{raw.index}"
        if raw.problem is not None:
            return None, (where, str(Problem(raw.shard, raw.index, None, raw.problem)))
        value = raw.value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                line = f"line {raw.line} " if raw.line is not None else ""
                return None, (where, str(Problem(raw.shard, raw.index, None,
                                                 f"{line}is not valid JSON ({err.msg})")))
        if raw.members is not None and isinstance(value, dict):
            # A .tar sample's images are its image members, whatever the record calls them.
            value = {k: v for k, v in value.items() if k not in ("image", "images")}
            value["image"] = list(raw.members)
        recipe = dataclasses.replace(self.recipe, file=raw.shard)
        record, problem, _, _ = usable_value(value, raw.index, recipe, _reader_of(value),
                                             raw.members)
        if record is None:
            return None, (where, problem)
        tokens = record["image_tokens"]
        tokenized = tokenize_record(record, self.tokenizer, recipe.template, self.max_length,
                                    self.image_id, tokens)
        if tokenized.status not in USABLE:
            return None, (record["id"], f"{raw.shard} id {record['id']!r}: {tokenized.status}")
        row = {name: record[name] for name in ("id", "images", "kinds", "image_sizes",
                                               "image_tokens")}
        row.update(input_ids=tokenized.input_ids, labels=tokenized.labels)
        length = len(tokenized.input_ids) + sum(tokens) - len(tokens)
        return _Sample(row, length, raw.members, raw.shard), None


def _pair_in_a_stream(raw: dict):
    raise ValueError("is a preference pair (prompt/chosen/rejected): a stream trains "
                     "conversations; stage dpo reads preference pairs from JSON/JSONL files")


def _reader_of(value: object):
    """The format reader of one record, from its keys (a stream may mix formats); a record
    of no known format gets one that says so."""
    if isinstance(value, dict):
        for name, (key, read_messages) in FORMATS.items():
            if key in value and name == PREFERENCE:
                return _pair_in_a_stream
            if key in value:
                return read_messages

    def unknown(raw: dict):
        raise ValueError(f"has keys {sorted(raw)[:8]}, which match no known format; each "
                         f"record needs {FORMAT_HELP}")

    return unknown
