"""What a dataset holds and left out, per file and per source: shown before and after training."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

EXAMPLES = 5
"""Problems quoted in a report (the first of them, in file order)."""


@dataclass
class SourceReport:
    """One source of a list or mixture (data/sources.py): its records and the samples drawn."""

    name: str
    """The file or glob as the config gives it."""
    files: int
    total: int
    """Records in its files."""
    kept: int
    """Usable samples among them (after the checks and max_length)."""
    rule: str
    """How samples were drawn: all, first:N, random:N, weight W."""
    selected: int
    """Samples it gives an epoch."""
    note: str | None = None
    """A warning: fewer samples than asked for, or a weight too small for any."""

    def line(self) -> str:
        files = f" ({self.files} files)" if self.files != 1 else ""
        text = (f"{self.name}{files}: {self.kept} of {self.total} kept, {self.rule}: "
                f"{self.selected} samples")
        return text + (f" (warning: {self.note})" if self.note else "")


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
    sources: list[SourceReport] = field(default_factory=list)
    """Per source, when the data is a list or mixture of several, or samples are drawn: the
    counts above are then every file's together (a file used twice, once)."""

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(example)

    @property
    def selected(self) -> int:
        """Samples an epoch draws: the kept ones, or the sources' draws."""
        return sum(s.selected for s in self.sources) if self.sources else self.kept

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
        if self.sources:
            lines.append(f"{self.selected} samples drawn from {len(self.sources)} "
                         f"source{'s' if len(self.sources) > 1 else ''}:")
            lines += [f"  {source.line()}" for source in self.sources]
        return "\n".join(lines)


def combine(reports: list[DataReport]) -> DataReport:
    """One report for several files' (each counted once): sums, skips merged, the first
    examples in order."""
    if len(reports) == 1:
        one = reports[0]
        return DataReport(one.total, one.kept, Counter(one.skipped), list(one.examples),
                          one.truncated, one.scaled_down, one.largest)
    skipped: Counter = Counter()
    for report in reports:
        skipped.update(report.skipped)
    return DataReport(
        total=sum(r.total for r in reports), kept=sum(r.kept for r in reports),
        skipped=skipped, examples=[e for r in reports for e in r.examples][:EXAMPLES],
        truncated=sum(r.truncated for r in reports),
        scaled_down=sum(r.scaled_down for r in reports),
        largest=next((r.largest for r in reports if r.largest is not None), None))
