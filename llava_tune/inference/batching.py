"""Many requests, one model: a queue answered in batches, each answer streamed on its own.

`Batcher` runs one thread that owns the model. Requests (`Job`s) wait in a queue; the
thread takes the oldest and every waiting job that can share its generation (greedy ones
together; sampled ones with the same temperature and top-p; a seeded one alone, so its
seed alone decides its answer), up to `max_batch`, and answers them together through
`generate_prompts`, the path `chat` and `eval` take. Left padding keeps a batch's greedy
answers equal to one-at-a-time answers.

Each step, `_Rows` (a stopping criterion, so it sees every new token of every row) turns a
row's tokens into text and sends the new text to its job's `on_event`: as `chat` ends an
answer it ends a row at a stop token, a loop (LoopStop), the row's own `max_tokens` or a
`stop` string, and at once when its client has gone (`Job.cancel`). A batch ends when all
its rows have. The batch is static: a request that arrives while one runs waits for it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from transformers import StoppingCriteria

from llava_tune.assembly.model import ModelBundle
from llava_tune.inference.generate import (
    GenerationSettings,
    LoopStop,
    Prompt,
    generate_prompts,
    stop_token_ids,
)

log = logging.getLogger("llava_tune.serve")


@dataclass(frozen=True)
class Delta:
    """New text of the answer (streamed)."""

    text: str


@dataclass(frozen=True)
class Done:
    """The answer, whole. `finish_reason`: "stop" (a stop token or string, or a loop) or
    "length" (max_tokens reached)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The model could not answer (a bug or the machine's trouble, never the client's)."""

    message: str


Event = Delta | Done | Failed


class QueueFull(Exception):
    """The queue holds `max_queue` jobs already; `retry_after` estimates when to ask again."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    """One request: its prompt, how to sample and when to stop. `on_event` is called from
    the generating thread with each Delta, then one Done or Failed (none once cancelled)."""

    prompt: Prompt
    settings: GenerationSettings
    """`max_new_tokens` is this job's max_tokens."""
    on_event: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client went away: drop the job if it waits, end its row if it runs."""
        self.cancelled.set()

    @property
    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one generation."""
        s = self.settings
        if s.temperature <= 0:
            return ("greedy", s.repetition_penalty)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sample", s.temperature, s.top_p, s.top_k, s.repetition_penalty)


class Batcher:
    """The queue and the thread that answers it (see the module's docstring).

    `max_batch`: rows generated together; `max_queue`: jobs that may wait (a submit past it
    raises QueueFull)."""

    def __init__(self, bundle: ModelBundle, max_batch: int = 8, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch {max_batch} and max_queue {max_queue} must be >= 1")
        self.bundle = bundle
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.stop_ids = set(stop_token_ids(bundle))
        self.byte_ids = byte_token_ids(bundle.tokenizer)
        self._waiting: deque[Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self.running = 0
        """Rows in the batch being generated (0 between batches)."""
        self.batches = 0
        """Batches generated so far."""
        self._seconds_per_batch = 1.0
        self._thread = threading.Thread(target=self._work, name="llava-tune-serve", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull when `max_queue` jobs wait already."""
        with self._ready:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                batches_ahead = 1 + len(self._waiting) // self.max_batch
                raise QueueFull(max(1, round(batches_ahead * self._seconds_per_batch)))
            self._waiting.append(job)
            self._ready.notify()

    def close(self) -> None:
        """Stop after the running batch; waiting jobs get Failed."""
        with self._ready:
            self._closed = True
            left, self._waiting = list(self._waiting), deque()
            self._ready.notify()
        for job in left:
            if not job.cancelled.is_set():
                job.on_event(Failed("the server is shutting down"))
        self._thread.join(timeout=60)

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._closed and not self._waiting:
                    self._ready.wait()
                if self._closed:
                    return
                batch = self._take()
                self.running = len(batch)
            if not batch:
                continue
            start = time.perf_counter()
            try:
                self._generate(batch)
            except Exception as err:  # the server goes on; each client hears why
                log.exception("generation failed for a batch of %d", len(batch))
                for job in batch:
                    if not job.cancelled.is_set():
                        job.on_event(Failed(f"{type(err).__name__}: {err}"))
            finally:
                elapsed = time.perf_counter() - start
                self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * elapsed
                self.running = 0
                self.batches += 1

    def _take(self) -> list[Job]:
        """The oldest waiting job and the waiting jobs that can join it (called locked);
        cancelled ones are dropped."""
        self._waiting = deque(job for job in self._waiting if not job.cancelled.is_set())
        if not self._waiting:
            return []
        first = self._waiting.popleft()
        batch, rest = [first], deque()
        while self._waiting:
            job = self._waiting.popleft()
            if len(batch) < self.max_batch and job.batch_key == first.batch_key:
                batch.append(job)
            else:
                rest.append(job)
        self._waiting = rest
        return batch

    def _generate(self, batch: list[Job]) -> None:
        rows = _Rows(self.bundle.tokenizer, batch, self.stop_ids, self.byte_ids)
        settings = batch[0].settings
        longest = max(job.settings.max_new_tokens for job in batch)
        if batch[0].seed is not None and settings.temperature > 0:
            torch.manual_seed(batch[0].seed)  # a seeded job runs alone (batch_key)
        generate_prompts(self.bundle, [job.prompt for job in batch],
                         replace(settings, max_new_tokens=longest),
                         stopping_criteria=[rows])
        rows.finish_all()


def byte_token_ids(tokenizer) -> set[int]:
    """Ids of sentencepiece's byte-fallback tokens (`<0x0A>`...)."""
    return {i for token, i in tokenizer.get_vocab().items() if _BYTE.fullmatch(token)}


_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class _Row:
    """One job's answer as it grows: its tokens, the text sent so far, why it ended."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.tokens: list[int] = []
        self.generated = 0
        self.sent = ""
        self.reason: str | None = None

    def finish(self, reason: str, text: str) -> None:
        self.reason = reason
        if reason == "cancelled":
            return
        text = text.strip()
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.job.on_event(Delta(text[len(self.sent):]))
        self.job.on_event(Done(text, reason, len(self.job.prompt.ids), self.generated))

    def send(self, text: str) -> None:
        """Send what can no longer change: trailing white space, an unfinished character
        and the start of a stop string wait for the next token."""
        text = text.rstrip().rstrip("\ufffd")
        for stop in self.job.stop:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    text = text[:-n]
                    break
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.job.on_event(Delta(text[len(self.sent):]))
            self.sent = text


class _Rows(StoppingCriteria):
    """Each step: the new token of every running row, its text, and whether it ended."""

    def __init__(self, tokenizer, jobs: list[Job], stop_ids: set[int],
                 byte_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.rows = [_Row(job) for job in jobs]
        self.stop_ids = stop_ids
        self.byte_ids = byte_ids
        self.loop = LoopStop()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        looping = self.loop(input_ids, scores).tolist()
        for row, token, loops in zip(self.rows, input_ids[:, -1].tolist(), looping, strict=True):
            if row.reason is None:
                self._step(row, token, loops)
        return torch.tensor([row.reason is not None for row in self.rows],
                            device=input_ids.device)

    def _step(self, row: _Row, token: int, loops: bool) -> None:
        row.generated += 1
        if row.job.cancelled.is_set():
            return row.finish("cancelled", "")
        if token in self.stop_ids:
            return row.finish("stop", self._text(row))
        row.tokens.append(token)
        ends = loops or row.generated >= row.job.settings.max_new_tokens
        if token in self.byte_ids and not ends:
            # A byte of a character: consecutive bytes decode together (an invalid run
            # becomes one U+FFFD per byte), so the text settles at the next other token.
            return None
        text = self._text(row)
        cuts = [i for i in (text.find(stop) for stop in row.job.stop) if i >= 0]
        if cuts:
            return row.finish("stop", text[:min(cuts)])
        if ends:
            return row.finish("stop" if loops else "length", text)
        row.send(text)
        return None

    def _text(self, row: _Row) -> str:
        # The whole answer decoded each step: a piece decoded alone may lose the space in
        # front of its first word (sentencepiece), and answers are short.
        return self.tokenizer.decode(row.tokens, skip_special_tokens=True).lstrip()

    def finish_all(self) -> None:
        """Rows generation ended without us (it reached the batch's max_new_tokens)."""
        for row in self.rows:
            if row.reason is None:
                row.finish("length", self._text(row))
