"""Progress bars for long steps (tokenizing, converting, loading, evaluating) on stderr.

Off by default, so the library stays silent; the CLI turns them on for a terminal unless
`--quiet`. One switch for our bars and the libraries' own (datasets, transformers).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_enabled = False


def enable(on: bool) -> None:
    global _enabled
    _enabled = on
    import datasets
    import transformers

    if on:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
    else:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def enabled() -> bool:
    return _enabled


def track(items: Iterable[T], total: int | None = None, desc: str = "",
          unit: str = "it") -> Iterator[T]:
    """`items`, with a bar (count, rate, ETA) on stderr when progress is on."""
    if not _enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr,
                    dynamic_ncols=True, leave=False)


class Bar:
    """A bar updated by hand (`update(n)`); silent when progress is off."""

    def __init__(self, total: int, desc: str = "", unit: str = "it") -> None:
        self._bar = None
        if _enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr,
                             dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def reached(self, done: int, total: int) -> None:
        """Show `done` of `total` (for callbacks that report counts, not increments)."""
        if self._bar is not None:
            self._bar.total = total
            self._bar.update(done - self._bar.n)
            self._bar.refresh()  # update() redraws at most every 0.1 s; callers report per batch

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
