"""Chat template: rendered text, token ids and the loss mask, checked against sentencepiece itself.

Expected ids are computed with `sentencepiece` directly: the fast tokenizer treats each text
span between special tokens as its own sentencepiece input (dummy prefix per span, as
InternLM2's tokenizers do), so the expectation encodes every span with `sp.encode`.
"""

from __future__ import annotations

import re

import pytest
import sentencepiece as spm

from llava_tune.assembly.llm import load_tokenizer
from llava_tune.constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava_tune.data.template import (
    INTERNLM2_CHAT,
    add_image_token,
    check_roles,
    expand_image_slots,
    get_template,
)
from llava_tune.errors import UserError

SPECIALS = ("<s>", "<|im_start|>", "<|im_end|>")


def sp_ids(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """Ids of `text`: special tokens by their piece id, every span between them by sp.encode."""
    ids = []
    pattern = "(" + "|".join(re.escape(s) for s in SPECIALS) + ")"
    for part in re.split(pattern, text):
        if part in SPECIALS:
            ids.append(sp.piece_to_id(part))
        elif part:
            ids += sp.encode(part)
    return ids


def expected_encoding(sp, messages):
    """(text, ids, labels) built piece by piece from the InternLM2 format, independent of
    llava_tune: answers and their <|im_end|> carry labels, nothing else."""
    im_start, im_end = sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>")
    text = "<s>"
    ids, labels = [sp.bos_id()], [IGNORE_INDEX]

    def context(piece_text, piece_ids):
        nonlocal text
        text += piece_text
        ids.extend(piece_ids)
        labels.extend([IGNORE_INDEX] * len(piece_ids))

    pending_system = None
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            pending_system = content
            continue
        if role == "user":
            if i == len(messages) - 1:
                break  # a trailing question without answer is not trained
            if pending_system is not None:
                context(f"<|im_start|>system\n{pending_system}<|im_end|>\n",
                        [im_start, *sp.encode(f"system\n{pending_system}"), im_end,
                         *sp.encode("\n")])
                pending_system = None
            context(f"<|im_start|>user\n{content}<|im_end|>\n",
                    [im_start, *sp.encode(f"user\n{content}"), im_end, *sp.encode("\n")])
        else:
            # "<|im_start|>assistant\n{answer}" is one sentencepiece span; "\n" is a byte piece
            # that merges with nothing, so the answer's tokens are the span's tail.
            prefix = sp.encode("assistant\n")
            span = sp.encode(f"assistant\n{content}")
            assert span[: len(prefix)] == prefix
            answer = span[len(prefix):]
            context("<|im_start|>assistant\n", [im_start, *prefix])
            text += f"{content}<|im_end|>"
            ids.extend([*answer, im_end])
            labels.extend([*answer, im_end])
            context("\n", sp.encode("\n"))
    return text, ids, labels


CONVERSATIONS = {
    "single": [
        {"role": "user", "content": "What color is the shape?"},
        {"role": "assistant", "content": "It is red."},
    ],
    "system": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "What shape is this?"},
        {"role": "assistant", "content": "It is a circle."},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a blue star\nWhat color is it?"},
        {"role": "assistant", "content": "It is blue."},
        {"role": "user", "content": "And the shape?"},
        {"role": "assistant", "content": "It is a star.\nA blue star."},
    ],
    "unicode": [
        {"role": "user", "content": "  spaces,\ttabs and 中文 😀?"},
        {"role": "assistant", "content": "Émoji 🎉 ok"},
    ],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_encode_matches_internlm2_format_token_by_token(name, tok, sp):
    messages = CONVERSATIONS[name]
    ids, labels = INTERNLM2_CHAT.encode(messages, tok)
    text, expected_ids, expected_labels = expected_encoding(sp, messages)

    assert INTERNLM2_CHAT.render(messages, tok.bos_token)[0] == text
    assert ids == expected_ids
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert labels == expected_labels
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id

    # The labelled tokens are exactly the answers, each followed by <|im_end|>.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert trained.count(im_end) == len(answers)
    assert tok.decode(trained) == "".join(a + "<|im_end|>" for a in answers)
    # The newline after each <|im_end|> is context only.
    for i, token in enumerate(ids):
        if token == im_end and labels[i] != IGNORE_INDEX:
            assert all(label == IGNORE_INDEX for label in labels[i + 1 : i + 3])


def test_rendered_text_is_exact():
    messages = CONVERSATIONS["multi_turn"]
    text, spans = INTERNLM2_CHAT.render(messages, "<s>")
    assert text == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\na blue star\nWhat color is it?<|im_end|>\n"
        "<|im_start|>assistant\nIt is blue.<|im_end|>\n"
        "<|im_start|>user\nAnd the shape?<|im_end|>\n"
        "<|im_start|>assistant\nIt is a star.\nA blue star.<|im_end|>\n"
    )
    assert [text[a:b] for a, b in spans] == [
        "It is blue.<|im_end|>", "It is a star.\nA blue star.<|im_end|>"]


def test_single_turn_without_system_has_no_system_block():
    text, _ = INTERNLM2_CHAT.render(CONVERSATIONS["single"], "<s>")
    assert text == ("<s><|im_start|>user\nWhat color is the shape?<|im_end|>\n"
                    "<|im_start|>assistant\nIt is red.<|im_end|>\n")


def test_trailing_question_is_dropped_from_training(tok):
    messages = CONVERSATIONS["single"] + [{"role": "user", "content": "Are you sure?"}]
    assert INTERNLM2_CHAT.encode(messages, tok) == INTERNLM2_CHAT.encode(
        CONVERSATIONS["single"], tok)


@pytest.mark.parametrize("history", [
    [{"role": "user", "content": "What color is the shape?"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "What shape is this?"}],
])
def test_prompt_ids_match_chat_template_and_end_with_generation_prompt(history, tok, sp):
    ids = INTERNLM2_CHAT.prompt_ids(history, tok)
    rendered = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids == sp_ids(sp, rendered)
    tail = [sp.piece_to_id("<|im_start|>"), *sp.encode("assistant\n")]
    assert ids[-len(tail):] == tail
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    # Training ids of the same conversation plus an answer start with the prompt.
    answered = history + [{"role": "assistant", "content": "It is red."}]
    train_ids, train_labels = INTERNLM2_CHAT.encode(answered, tok)
    assert train_ids[: len(ids)] == ids
    assert set(train_labels[len(ids) - len(tail): len(ids)]) == {IGNORE_INDEX}
    new = [t for t in train_labels[len(ids):] if t != IGNORE_INDEX]
    assert tok.decode(new) == "It is red.<|im_end|>"


@pytest.mark.parametrize("messages, fragment", [
    ([{"role": "assistant", "content": "a"}], "message 0 has role 'assistant' where 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "message 1 has role 'user' where 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
     "message 1 has role 'system'"),
    ([{"role": "bot", "content": "a"}], "message 0 has role 'bot'"),
    ([{"content": "a"}], "message 0 has role None"),
])
def test_check_roles_errors(messages, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        check_roles(messages)
    with pytest.raises(ValueError):
        INTERNLM2_CHAT.render(messages, "<s>")


def test_check_roles_accepts_system_then_alternating():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert check_roles(messages) is None  # accepted: no exception
    text, spans = INTERNLM2_CHAT.render(messages, "<s>", add_generation_prompt=True)
    assert text == ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n"
                    "<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert [text[a:b] for a, b in spans] == ["a1<|im_end|>"]


def test_get_template():
    assert get_template("internlm2_chat") is INTERNLM2_CHAT
    with pytest.raises(UserError, match="unknown template 'llama3'.*internlm2_chat"):
        get_template("llama3")


def test_add_image_token_is_one_token_and_idempotent(tiny_lm, sp):
    tok = load_tokenizer(tiny_lm)  # its own: conftest's `tok` is shared, so never changed
    size = len(tok)
    image_id = add_image_token(tok)
    assert image_id == size
    assert len(tok) == size + 1
    assert add_image_token(tok) == image_id and len(tok) == size + 1
    ids = tok("<image>\nWhat is this?<image>", add_special_tokens=False)["input_ids"]
    assert ids == [image_id, *sp.encode("\nWhat is this?"), image_id]
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\nWhat color?"},
                {"role": "assistant", "content": "Red."}]
    ids, labels = INTERNLM2_CHAT.encode(messages, tok)
    assert ids.count(image_id) == 1
    assert labels[ids.index(image_id)] == IGNORE_INDEX
    # "<|im_start|>user\n" then the image, then the question.
    assert ids[:ids.index(image_id)] == [1, sp.piece_to_id("<|im_start|>"), *sp.encode("user\n")]


def test_expand_image_slots():
    img = 99
    ids = [1, img, 5, 6, img, 7]
    labels = [-100, -100, -100, 6, -100, 7]
    out_ids, out_labels = expand_image_slots(ids, labels, img, 3)
    s = IMAGE_TOKEN_INDEX
    assert out_ids == [1, s, s, s, 5, 6, s, s, s, 7]
    assert out_labels == [-100, -100, -100, -100, -100, 6, -100, -100, -100, 7]
    assert expand_image_slots(ids, None, img, 2) == ([1, s, s, 5, 6, s, s, 7], None)
    # No image id (text-only): unchanged.
    assert expand_image_slots([1, 2, 3], [1, 2, 3], None, 4) == ([1, 2, 3], [1, 2, 3])
