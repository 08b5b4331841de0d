"""Where a dataset's samples come from: data.train (or data.eval) resolved into sources, and
the samples each source gives an epoch.

data.train takes a file, a glob, a list of files and globs, or a mixture whose items are
mappings {path, image_folder, weight | samples} (config.SourceConfig; a plain string item is
{path: it}). Each item is one source; a glob's matches (sorted, files only) are one source
together. Every file is prepared on its own (data/prepare.py: cached per file, so a file
shared by runs or sources is tokenized once); a source's samples are then drawn from the
usable samples of its files, in order:

- `samples: all` (the default): every usable sample, once.
- `samples: first:N`: the first N; `random:N`: N drawn without replacement, seeded by
  train.seed and the source's position in the list. N may be a percentage of the source's
  usable samples (`random:10%`, rounded up, as LLaVA-OneVision's sampling_strategy). A source
  with fewer than N usable samples gives all it has, with a warning in the report (records
  may be skipped at preparation, so the count the author had in mind can fall short).
- `weight: W`: the weighted sources share the samples they hold together (T, the sum of
  their usable samples) in proportion to their weights: source i gives T * W_i / sum(W),
  rounded so that the counts add up to T exactly (largest remainders). Below its size a
  source gives that many drawn without replacement; above it, every sample floor(c / size)
  times and c mod size more drawn without replacement (so no sample comes twice more than
  another). Sources with `samples` keep their own counts beside them.

The draw is made once per run (every epoch sees the same samples, in a new order), the same
in every process, and again the same on resume.

A folder given alone as data.train (a plain path, config.train_is_stream) is a stream of
shards, data/stream.py's, and never reaches this module. A folder anywhere else (an item of
a list or mixture, or data.eval) is refused here, the one place a source is resolved: a
stream cannot be one source of a mixture (yet), and held-out data is files.
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_tune.config import DataConfig, DataSpec, SourceConfig, parse_samples, train_is_stream
from llava_tune.errors import UserError

GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Rule:
    """How a source's samples are drawn (see the module's docstring)."""

    kind: str = "all"
    """all, first, random or weight."""
    count: int | None = None
    percent: float | None = None
    weight: float | None = None

    def __str__(self) -> str:
        if self.kind == "weight":
            return f"weight {self.weight:g}"
        if self.kind == "all":
            return "all"
        amount = f"{self.percent:g}%" if self.percent is not None else str(self.count)
        return f"{self.kind}:{amount}"

    def asked(self, size: int) -> int:
        """The samples first:N / random:N asks of a source of `size` usable samples."""
        if self.percent is not None:
            return math.ceil(self.percent * size / 100)
        assert self.count is not None, self
        return self.count


@dataclass(frozen=True)
class Source:
    """One item of data.train: its files (a glob's matches, sorted), image folder and rule."""

    name: str
    """The file or glob as the config gives it."""
    files: tuple[Path, ...]
    image_folder: Path | None
    rule: Rule = Rule()


def rule_of(entry: SourceConfig) -> Rule:
    """The Rule of a mixture item whose values config.validate has accepted."""
    if entry.weight is not None:
        return Rule("weight", weight=float(entry.weight))
    if entry.samples is None:
        return Rule()
    kind, count, percent = parse_samples(entry.samples)
    return Rule(kind, count, percent)


def _entries(key: str, spec: DataSpec) -> list[tuple[str, SourceConfig]]:
    """(how errors name it, its mapping) for each item; a lone string is named `key`."""
    if isinstance(spec, str):
        return [(key, SourceConfig(path=spec))]
    return [(f"{key}[{index}]", SourceConfig(path=entry) if isinstance(entry, str) else entry)
            for index, entry in enumerate(spec)]


def _files(where: str, pattern: str) -> tuple[list[Path], str | None]:
    """The files a path or glob names, or why there are none."""
    if GLOB_CHARS & set(pattern):
        matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True))
        files = [m for m in matches if m.is_file()]
        if not files:
            also = f" ({len(matches)} folders matched)" if matches else ""
            return [], (f"{where} glob {pattern} matches no file{also}; check the pattern "
                        "(* ? [...] in a name, ** for any folders below)")
        return files, None
    path = Path(pattern)
    if path.is_dir():
        return [], _folder_problem(where, pattern)
    if not path.is_file():
        return [], f"{where} file {pattern} not found"
    return [path], None


def _folder_problem(where: str, pattern: str) -> str:
    """Why a folder cannot be a source. data.train given as one folder is a stream
    (config.train_is_stream; setup sends it to data/stream.py, not here)."""
    glob_of = Path(pattern) / "*.json"
    text = (f"{where} {pattern} is a folder; give a JSON/JSONL file, or a glob of the files in "
            f"it such as {glob_of}")
    if where.startswith("data.eval"):
        return text + (" (held-out data is files: only data.train, given alone as one folder, "
                       "is read as a stream of shards)")
    if "[" in where:
        return text + (". A folder of shards is read as a stream only when it is data.train by "
                       "itself (data.train: FOLDER); a stream cannot be an item of a list or "
                       "mixture (not yet)")
    return text + " (a folder of shards given as data.train alone is read as a stream)"


def _resolve(key: str, spec: DataSpec, image_folder: str | None,
             needs_images: bool) -> tuple[list[Source], list[str]]:
    sources, problems = [], []
    for where, entry in _entries(key, spec):
        if not entry.path.strip():
            continue  # config.validate names it
        files, problem = _files(where, entry.path)
        if problem:
            problems.append(problem)
        folder = entry.image_folder if entry.image_folder is not None else image_folder
        if needs_images and entry.image_folder is not None and not Path(folder).is_dir():
            what = "is not a folder" if Path(folder).exists() else "not found"
            problems.append(f"{where} ({entry.path}): image_folder {folder} {what}")
        sources.append(Source(entry.path, tuple(files), Path(folder) if folder else None,
                              rule_of(entry)))
    return sources, problems


def resolve_sources(spec: DataSpec, image_folder: str | None, key: str = "data.train",
                    needs_images: bool = True) -> list[Source]:
    """data.train's (or data.eval's, named by `key`) sources, their globs expanded; every
    problem (a glob that matches nothing, a missing file, a folder, an image folder that is
    not one) in one UserError. `image_folder` is data.image_folder, the sources' default."""
    sources, problems = _resolve(key, spec, image_folder, needs_images)
    if problems:
        raise UserError("cannot read the data:\n  " + "\n  ".join(problems))
    return sources


def source_problems(data: DataConfig, needs_images: bool) -> list[str]:
    """Every problem with the files of data.train and data.eval (for the checks made before
    anything loads)."""
    problems = []
    for key, spec in (("data.train", data.train), ("data.eval", data.eval)):
        if key == "data.train" and train_is_stream(spec):
            continue  # a stream's shards are data/stream.py's (config.check_paths, setup)
        if spec:
            problems += _resolve(key, spec, data.image_folder, needs_images)[1]
    return problems


# --------------------------------------------------------------------------- drawing


def weighted_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Samples per weighted source: sum(sizes) shared in proportion to `weights`, rounded by
    largest remainders (ties to the earlier source) so that they add up to sum(sizes)."""
    total, whole = sum(sizes), sum(weights)
    exact = [total * w / whole for w in weights]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def _rng(seed: int, position: int) -> np.random.Generator:
    # SeedSequence takes non-negative integers; the mask keeps a negative train.seed usable.
    return np.random.default_rng([seed & (2**64 - 1), position])


def _take(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices of range(size), sorted: without replacement up to `size`; beyond it
    every index count // size times and count % size more without replacement."""
    whole, rest = divmod(count, size) if size else (0, 0)
    picked = rng.choice(size, rest, replace=False) if rest else np.zeros(0, np.int64)
    return np.sort(np.concatenate([np.tile(np.arange(size), whole), picked]).astype(np.int64))


def draw(sources: list[Source], sizes: list[int], seed: int) -> list[tuple[np.ndarray, str | None]]:
    """Per source, the indices of its usable samples an epoch takes ([n] int64, sorted:
    repeats side by side) and a warning or None; `sizes` are the sources' usable samples."""
    weighted = [i for i, s in enumerate(sources) if s.rule.kind == "weight"]
    counts = dict(zip(weighted, weighted_counts([sizes[i] for i in weighted],
                                                [sources[i].rule.weight for i in weighted]),
                      strict=True)) if weighted else {}
    drawn: list[tuple[np.ndarray, str | None]] = []
    for position, (source, size) in enumerate(zip(sources, sizes, strict=True)):
        rule, note = source.rule, None
        if rule.kind == "all":
            indices = np.arange(size, dtype=np.int64)
        elif rule.kind == "weight":
            count = counts[position]
            indices = _take(size, count, _rng(seed, position))
            if count == 0:
                note = "its weight's share rounds to no sample"
        else:
            asked = rule.asked(size)
            if asked > size:
                note = f"{rule} asks for {asked} samples, it has {size} usable: all taken"
            count = min(asked, size)
            indices = (np.arange(count, dtype=np.int64) if rule.kind == "first"
                       else _take(size, count, _rng(seed, position)))
        drawn.append((indices, note))
    return drawn
