"""One conversation record to token ids and labels: a pure function, tested directly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from llava_tune.constants import IGNORE_INDEX
from llava_tune.data.template import ChatTemplate

OK = "ok"
TRUNCATED = "truncated"
IMAGE_CUT = "an image does not fit in max_length"
NO_ANSWER = "no answer within max_length"
USABLE = (OK, TRUNCATED)


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    """[T]; each `<image>` is still one id here (the dataset expands it to N slots)."""
    labels: list[int]
    """[T]; IGNORE_INDEX outside the answers."""
    status: str
    """OK, TRUNCATED, or why the record cannot train (IMAGE_CUT, NO_ANSWER)."""


def tokenize_record(record: dict, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
                    max_length: int, image_token_id: int | None = None,
                    num_image_tokens: int | Sequence[int] = 0) -> Tokenized:
    """Ids and labels of a record's conversation, as long as they fit in `max_length` once
    every `<image>` becomes `num_image_tokens` slots (or the i-th image the i-th count).

    A longer sample is cut at max_length (TRUNCATED), unless the cut would go through an image
    (IMAGE_CUT) or leave no answer to learn from (NO_ANSWER): such a sample cannot train.
    """
    ids, labels = template.encode(record["messages"], tokenizer)
    slots = [i for i, token in enumerate(ids) if token == image_token_id] if image_token_id is not None else []
    counts = ([num_image_tokens] * len(slots) if isinstance(num_image_tokens, int)
              else list(num_image_tokens))
    extra = sum(counts) - len(counts)  # each image id becomes its count of slots
    if len(ids) + extra <= max_length:
        return Tokenized(ids, labels, OK)
    last_image_end = slots[-1] + 1 + extra if slots else 0
    if last_image_end > max_length:
        return Tokenized([], [], IMAGE_CUT)
    keep = max_length - extra
    if all(label == IGNORE_INDEX for label in labels[:keep]):
        return Tokenized([], [], NO_ANSWER)
    return Tokenized(ids[:keep], labels[:keep], TRUNCATED)


def _last_answer(labels: list[int]) -> tuple[int, int]:
    """[start, end) of the last run of labels that carry a loss: the final answer."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def last_answer_only(labels: list[int]) -> list[int]:
    """`labels` with every answer but the last set to IGNORE_INDEX: a preference pair learns
    from its final answer alone (the conversation before it is the prompt)."""
    start, end = _last_answer(labels)
    return [IGNORE_INDEX] * start + labels[start:end] + [IGNORE_INDEX] * (len(labels) - end)


def tokenize_pair(record: dict, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
                  max_length: int, image_id: int | None = None,
                  num_image_tokens: int | Sequence[int] = 0) -> tuple[Tokenized, Tokenized]:
    """A preference record's two sequences, the prompt followed by the chosen answer and by
    the rejected one (`record["rejected"]`), each as tokenize_record makes it with labels on
    that final answer only. Either one unusable makes both so (the pair trains whole)."""
    prompt = record["messages"][:-1]
    sides = []
    for answer in (record["messages"][-1]["content"], record["rejected"]):
        messages = [*prompt, {"role": "assistant", "content": answer}]
        side = tokenize_record({"messages": messages}, tokenizer, template, max_length, image_id,
                               num_image_tokens)
        if side.status == TRUNCATED:
            # The cut may have taken the whole final answer and left an earlier one.
            whole = template.encode(messages, tokenizer)[1]
            if len(side.labels) <= _last_answer(whole)[0]:
                side = Tokenized([], [], NO_ANSWER)
        sides.append(Tokenized(side.input_ids, last_answer_only(side.labels), side.status))
    bad = next((side.status for side in sides if side.status not in USABLE), None)
    if bad is not None:
        return Tokenized([], [], bad), Tokenized([], [], bad)
    chosen, rejected = sides
    return chosen, rejected
