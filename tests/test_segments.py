"""Tokenizing in segments on the demo tokenizer (sentencepiece BPE with a dummy prefix, the
fixture `tiny_lm` trains): no token straddles a cut, nothing changes where none would have,
and answers that start with white space keep every label.

The real InternLM2 tokenizer (no dummy prefix, where "\\n" + "\\n\\n" is one piece) is checked
in test_tokenizer_real.py.
"""

from __future__ import annotations

import random

import pytest

from llava_tune.constants import IGNORE_INDEX
from llava_tune.data import segments
from llava_tune.data.segments import encode_segments
from llava_tune.data.template import INTERNLM2_CHAT

TEXTS = ["a red circle and a blue square", "What color is the shape?\nIt is red.",
         "  two spaces,\ttab and\n\nnewlines \n", "中文 😀 émoji"]


def test_a_cut_inside_a_merged_piece_gives_tokens_that_continue(tok):
    """'▁red' straddles the cut 're|d': the second segment is tokenized as a continuation
    (no dummy prefix), so the ids still spell the text."""
    assert "▁red" in tok.get_vocab()
    text = "a red circle"
    assert tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False)) == [
        "▁a", "▁red", "▁circle"]
    first, second = encode_segments(tok, ["a re", "d circle"])
    assert first == tok.encode("a re", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(second) == ["d", "▁circle"]
    assert tok.decode(first + second) == text


def test_segments_spell_the_text_and_match_whole_tokenization_without_straddles(tok):
    rng = random.Random(0)
    matched = 0
    for _ in range(200):
        text = rng.choice(TEXTS)
        cuts = sorted(set(rng.sample(range(1, len(text)), rng.randint(1, 3))))
        segments = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        ids = [t for part in encode_segments(tok, segments) for t in part]
        assert tok.decode(ids) == tok.decode(tok.encode(text, add_special_tokens=False)), segments
        whole = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if not any(a < cut < b for a, b in whole["offset_mapping"] for cut in cuts):
            assert ids == whole["input_ids"], segments
            matched += 1
    assert 20 < matched < 200  # both cases occurred


def test_empty_segments_and_a_cut_after_a_special_token(tok, sp):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # After a special token a new span starts: the dummy prefix applies, as in one string.
    assert encode_segments(tok, ["", "hi<|im_end|>", "", "\nred"]) == [
        [], [*sp.encode("hi"), im_end], [], sp.encode("\nred")]


ANSWERS = ["\nIt is red.", "\n\nIt is red.", "  It is red.", "\tred", " \n red \n", "red"]


@pytest.mark.parametrize("answer", ANSWERS)
def test_answers_starting_with_white_space_keep_their_labels(answer, tok, sp):
    history = [{"role": "user", "content": "What color is the shape?"}]
    prompt = INTERNLM2_CHAT.prompt_ids(history, tok)
    ids, labels = INTERNLM2_CHAT.encode(history + [{"role": "assistant", "content": answer}], tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # sentencepiece's ids of the span "assistant\n{answer}", past those of "assistant\n".
    head, span = sp.encode("assistant\n"), sp.encode(f"assistant\n{answer}")
    assert span[: len(head)] == head
    answer_ids = span[len(head):]
    assert ids == [*prompt, *answer_ids, im_end, *sp.encode("\n")]
    assert labels == [IGNORE_INDEX] * len(prompt) + [*answer_ids, im_end] + [IGNORE_INDEX] * (
        len(ids) - len(prompt) - len(answer_ids) - 1)
    # Decoded after the prompt (decoding from the start would drop the dummy prefix's space).
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(prompt + trained) == tok.decode(prompt) + answer + "<|im_end|>"


ENCODED = [*TEXTS, "", "<|im_start|>user\n<image>\nWhat?<|im_end|>\n", "\ue000\n\nred", "a" * 300]


def test_the_direct_backend_encodes_like_the_tokenizers_call(image_tok):
    """segments._encoder calls the Rust backend itself (transformers' call costs twice the
    encode); it must give the call's ids and offsets, control and image tokens included."""
    encode = segments._encoder(image_tok)
    assert encode.__qualname__ == "_encoder.<locals>.encode_direct"
    for text in ENCODED:
        call = image_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encode(text)
        assert (ids, [tuple(o) for o in offsets]) == (
            call["input_ids"], [tuple(o) for o in call["offset_mapping"]]), text


def test_the_call_is_used_where_the_backend_alone_would_differ(tiny_lm):
    """Truncation or padding set on the backend, or special tokens split, which transformers'
    call switches per call: the encoder falls back to the call, and the ids stay the call's."""
    from llava_tune.assembly.llm import load_tokenizer

    text = "<|im_start|>user\na red circle and a blue square<|im_end|>"
    for change in ("truncation", "padding", "split"):
        tokenizer = load_tokenizer(tiny_lm)
        if change == "truncation":
            tokenizer._tokenizer.enable_truncation(max_length=3)
        elif change == "padding":
            tokenizer._tokenizer.enable_padding(length=64)
        else:
            tokenizer.split_special_tokens = True
        encode = segments._encoder(tokenizer)
        assert encode.__qualname__ == "_encoder.<locals>.encode_call", change
        call = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert encode(text)[0] == call["input_ids"], change
        assert len(call["input_ids"]) not in (3, 64)  # the call switched them off
