"""Tokenize a text in segments so that no token straddles a segment boundary.

Chat templates cut a conversation at its answers' boundaries. Tokenized as one string, BPE can
merge the prompt's last token with the answer's first: InternLM2's prompt ends with
"<|im_start|>assistant\\n", and an answer that starts with "\\n\\n" would share the piece
"\\n\\n\\n" with it. That token is neither the prompt inference feeds the model nor a token
generation could produce after it, and no label can cover it. Tokenized in segments, the
tokens before an answer are exactly the prompt's, and the answer's tokens are the ones the
model should generate after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

ENCODING_VERSION = 2
"""Bumped when the same conversation and tokenizer may give other ids or labels (2: segments
cut at the answers); part of the tokenized-data cache key."""

STAND_IN = "\ue000"
"""A left neighbour for a segment whose real one merges with it: a private-use character,
which byte-fallback and unknown-token tokenizers keep as tokens of its own."""


def encode_segments(tokenizer: PreTrainedTokenizerBase, segments: Sequence[str]) -> list[list[int]]:
    """Token ids of each segment of a text (no special tokens added), in order.

    Each segment is tokenized after the previous segment's last token (as text), and keeps
    the tokens that follow it. Where no token straddles the boundary this is exactly what
    tokenizing the whole text at once gives (a BPE merge that does not cross the boundary
    does not depend on the other side), including whether a segment starts a new span
    (after a special token, where a dummy prefix applies) or continues one. Where a token
    would straddle it, the segment is tokenized as a continuation of a neutral left neighbour
    (`STAND_IN`), and as a text of its own only if that merges with it as well.
    Cuts inside a special token split it into text; callers cut between tokens they know.
    """
    encode = _encoder(tokenizer)
    out: list[list[int]] = []
    anchor = ""
    for segment in segments:
        ids, anchor = _continuation(encode, anchor, segment)
        out.append(ids)
    return out


Encode = Callable[[str], tuple[list[int], list[tuple[int, int]]]]
"""text -> (ids, character offsets of each token), no special tokens added."""


def _encoder(tokenizer: PreTrainedTokenizerBase) -> Encode:
    """The tokenizer's Rust backend called directly where that gives what `tokenizer(text,
    add_special_tokens=False)` gives, else that call.

    Why: transformers' call costs ~20 us of Python around a ~10 us encode (measured with the
    demo's and InternLM2's tokenizers), and a conversation takes two encodes per segment, so
    the wrapper was more than half of tokenizing a data file (the demo's finetune records
    3,406 -> 8,141 a second without it). The wrapper's own work for this call
    is to switch the backend's truncation and padding off and set its special-token splitting
    to the tokenizer's setting: where the backend is already so, and the tokenizer's class
    keeps transformers' own encoding (some model tokenizers override it), the results are the
    same (tests/test_segments.py compares them).
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    kind = type(tokenizer)
    if (isinstance(tokenizer, PreTrainedTokenizerFast) and isinstance(backend, Tokenizer)
            and kind.__call__ is PreTrainedTokenizerFast.__call__
            and kind._encode_plus is PreTrainedTokenizerFast._encode_plus
            and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens",
                                                              False))):
        def encode_direct(text: str) -> tuple[list[int], list[tuple[int, int]]]:
            enc = backend.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets

        return encode_direct

    def encode_call(text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    return encode_call


def _continuation(encode: Encode, anchor: str, text: str) -> tuple[list[int], str]:
    """(ids of `text` after `anchor`, the text of the last token so far)."""
    if not text:
        return [], anchor
    for left in (anchor, STAND_IN) if anchor else ("",):
        head = encode(left)[0] if left else []
        ids, offsets = encode(left + text)
        # Clean: the left part keeps its own tokens and none of the rest reaches into it.
        if ids[: len(head)] == head and all(start >= len(left) for start, _ in offsets[len(head):]):
            return ids[len(head):], _last_token_text(left + text, offsets[len(head):], anchor)
    ids, offsets = encode(text)
    return ids, _last_token_text(text, offsets, anchor)


def _last_token_text(text: str, offsets: list[tuple[int, int]], default: str) -> str:
    for start, end in reversed(offsets):
        if end > start:
            return text[start:end]
    return default
