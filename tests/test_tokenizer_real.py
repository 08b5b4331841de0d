"""InternLM2's real tokenizer.model: our fast tokenizer against sentencepiece itself.

The fixture (../shared/fixtures/internlm2-tokenizer, see its PROVENANCE.md) lives outside the
repository; a fresh clone has no ../shared and these tests skip. Expected ids come from
`sentencepiece.SentencePieceProcessor` directly; chat markup the way InternLM2's official
tokenizer handles it: the control tokens by id, sentencepiece on each text span between them.
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from llava_tune.assembly.llm import load_tokenizer
from llava_tune.cli.chat import _Printer
from llava_tune.constants import IGNORE_INDEX
from llava_tune.data.segments import encode_segments
from llava_tune.data.template import INTERNLM2_CHAT

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "internlm2-tokenizer"
CONTROL = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|plugin|>": 92538, "<|interpreter|>": 92539,
           "<|action_end|>": 92540, "<|action_start|>": 92541, "<|im_end|>": 92542,
           "<|im_start|>": 92543}
ELLIPSIS, DASH = 92396, 92395  # user-defined pieces "……" and "——"

TEXTS = {
    "chinese": "我不知道……也许明天再说吧。人工智能是计算机科学的一个分支——它研究如何让机器像人一样思考。",
    "mixed": "InternLM2 是一个大语言模型, supports 200k context; 请用English回答: what is 1+1?",
    "code": 'def add(a, b):\n    """两数之和."""\n    return a + b\n\nif __name__ == "__main__":\n\tprint(add(1, 2))\n',
    "whitespace": "a  b   c    d\t\te\t \t f\n\ng\n\n\nh\n\n\n\n\ni   \n  \n\t\n",
    "full_width": "ＡＢＣＤＥＦＧＨＩＪＫＬＭＮＯＰＱＲＳＴＵＶＷＸＹＺａｂｃｄｅｆｇｈｉｊｋｌｍｎｏｐｑｒｓｔｕｖｗｘｙｚ０１２３",
    "punctuation": "……——“引号”、《书名》，（括号）！？；：……—— —— ……",
    "byte_fallback": "𠮷野家 😀🎉👍🏽 𪚥龘 \u200b\u00a0 ∑√€ é ß ﷺ",
    "nul_and_literal_pieces": "a\x00b [UNUSED_TOKEN_0] x[UNUSED_TOKEN_12]y",
    "leading_spaces": "   three spaces, then text  ",
}


@pytest.fixture(scope="module")
def sp():
    if not (FIXTURE / "tokenizer.model").is_file():
        pytest.skip(f"InternLM2's real tokenizer is not at {FIXTURE} (a sibling checkout's "
                    "shared/fixtures); these parity checks need it")
    return spm.SentencePieceProcessor(model_file=str(FIXTURE / "tokenizer.model"))


@pytest.fixture(scope="module")
def tok(sp):
    return load_tokenizer(FIXTURE)


def sp_markup_ids(sp, text: str) -> list[int]:
    """InternLM2's official tokenizer on chat markup: control tokens by id, sentencepiece on
    each text span between them."""
    pattern = "(" + "|".join(re.escape(t) for t in CONTROL) + ")"
    ids: list[int] = []
    for part in re.split(pattern, text):
        if part in CONTROL:
            ids.append(CONTROL[part])
        elif part:
            ids += sp.encode(part)
    return ids


def without_control(text: str) -> str:
    for token in CONTROL:
        text = text.replace(token, "")
    return text


# --- encoding and decoding --------------------------------------------------------------


def test_vocab_and_control_ids(tok, sp):
    assert len(tok) == sp.get_piece_size() == 92544
    assert tok.convert_tokens_to_ids(list(CONTROL)) == list(CONTROL.values())
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.convert_ids_to_tokens([ELLIPSIS, DASH]) == ["……", "——"]


@pytest.mark.parametrize("name", list(TEXTS))
def test_text_encodes_and_decodes_like_sentencepiece(name, tok, sp):
    text = TEXTS[name]
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == sp.encode(text)
    assert sp.decode(ids) == text
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok(text)["input_ids"] == [1, *sp.encode(text)]


def test_the_texts_exercise_what_they_claim(tok, sp):
    """Guards the parametrized texts: user-defined pieces, byte fallback and the NUL piece
    really occur in them."""
    ids = {name: sp.encode(text) for name, text in TEXTS.items()}
    assert ELLIPSIS in ids["chinese"] and DASH in ids["chinese"]
    assert {92374, 92394} <= set(ids["full_width"])  # ｆ, ｚ: user-defined pieces
    assert any(sp.is_byte(i) for i in ids["byte_fallback"])
    assert 3 in ids["nul_and_literal_pieces"]  # NUL is the byte <0x00> ...
    assert 354 not in ids["nul_and_literal_pieces"]  # ... not the unused NUL piece 354
    assert {92397, 92409} <= set(ids["nul_and_literal_pieces"])  # "[UNUSED_TOKEN_0]", "_12]"
    assert [sp.id_to_piece(i) for i in sp.encode("\n\n\n")] == ["\n\n\n"]


def test_the_answer_that_lost_its_ellipsis(tok):
    ids = tok.encode("我不知道……也许明天再说吧。", add_special_tokens=False)
    assert ELLIPSIS in ids
    assert tok.decode(ids, skip_special_tokens=True) == "我不知道……也许明天再说吧。"


def test_only_control_tokens_are_skipped(tok, sp):
    decoded = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=True)
    assert {i for i, text in enumerate(decoded) if text == ""} == set(CONTROL.values())
    for i in range(92352, 92538):  # full-width letters, ——, ……, [UNUSED_TOKEN_0..140]
        assert sp.id_to_piece(i) == decoded[i] == sp.decode([i])
    assert decoded[354] == sp.decode([354]) == "\x00"


def test_random_vocab_text_encodes_like_sentencepiece(tok, sp):
    """Strings glued from random pieces (any script, any merge) plus rare characters."""
    rng = random.Random(0)
    extra = "\x00\t\n  ……——ＡｚＱ😀𠮷"
    for _ in range(300):
        pieces = [sp.id_to_piece(rng.randrange(259, 92538)) for _ in range(rng.randint(1, 10))]
        text = "".join(pieces).replace("▁", " ") + "".join(rng.sample(extra, rng.randint(0, 4)))
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), repr(text)
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids)


def test_the_direct_backend_encodes_like_the_tokenizers_call(tok, sp):
    """The segments' encoder skips transformers' call (llava_tune/data/segments.py): on the
    real tokenizer it gives the call's ids and offsets for every text here, control tokens
    and the stand-in character included."""
    from llava_tune.data.segments import STAND_IN, _encoder

    encode = _encoder(tok)
    assert encode.__qualname__.endswith("encode_direct")
    rng = random.Random(1)
    random_texts = ["".join(sp.id_to_piece(rng.randrange(259, 92538)) for _ in range(8))
                    .replace("▁", " ") for _ in range(100)]
    for text in [*TEXTS.values(), "<|im_start|>user\n你好<|im_end|>\n", STAND_IN + "\n\n",
                 *random_texts]:
        call = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encode(text)
        assert ids == call["input_ids"] and list(map(tuple, offsets)) == list(
            map(tuple, call["offset_mapping"])), repr(text)


def test_chat_markup_splits_on_control_tokens(tok, sp):
    text = ("<s><|im_start|>system\n你是一个乐于助人的助手。<|im_end|>\n"
            "<|im_start|>user\n这张图片里有什么……？ What's in it?<|im_end|>\n"
            "<|im_start|>assistant\n\n\n一只猫——很可爱 😀<|im_end|>\n"
            "<|im_start|>user\n<|action_start|><|interpreter|>\nprint(1)<|action_end|>\n<|im_end|>\n"
            "<|plugin|>ＡＢＣ</s>")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == sp_markup_ids(sp, text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == without_control(text)
    assert tok.apply_chat_template(
        [{"role": "user", "content": "你好……"}], add_generation_prompt=True)["input_ids"] == \
        sp_markup_ids(sp, "<s><|im_start|>user\n你好……<|im_end|>\n<|im_start|>assistant\n")


def test_saved_tokenizer_json_keeps_it(tmp_path, tok, sp):
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    for text in TEXTS.values():
        ids = loaded.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text)
        assert loaded.decode(ids, skip_special_tokens=True) == text
    assert loaded.decode([1, ELLIPSIS, 92542], skip_special_tokens=True) == "……"


# --- answers keep their labels -----------------------------------------------------------

ANSWERS = ["\n\n一只猫。", "\nhi", "\n\n\n\n```python\nprint(1)\n```", "  两个空格", "\t缩进",
           "……嗯", "——好", "😀 开心", "普通回答。"]


@pytest.mark.parametrize("answer", ANSWERS)
def test_answer_tokens_follow_the_prompt_and_all_carry_labels(answer, tok, sp):
    history = [{"role": "user", "content": "描述一下。"}]
    prompt = INTERNLM2_CHAT.prompt_ids(history, tok)
    ids, labels = INTERNLM2_CHAT.encode(history + [{"role": "assistant", "content": answer}], tok)
    assert prompt == sp_markup_ids(sp, "<s><|im_start|>user\n描述一下。<|im_end|>\n<|im_start|>assistant\n")
    # Inference feeds `prompt`; the answer is what generation should add after it.
    assert ids == [*prompt, *sp.encode(answer), 92542, *sp.encode("\n")]
    assert labels == [IGNORE_INDEX] * len(prompt) + [*sp.encode(answer), 92542, IGNORE_INDEX]
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == answer + "<|im_end|>"


def test_whole_string_tokenization_would_have_merged_the_boundary(sp):
    """Why the template cuts at the answer: '\\n' + '\\n\\n' is one piece."""
    prompt = sp.encode("assistant\n")
    whole = sp.encode("assistant\n\n\n一只猫。")
    assert whole[: len(prompt)] != prompt


def test_multi_turn_training_ids_extend_every_prompt(tok, sp):
    conversation = [{"role": "system", "content": "简洁。"},
                    {"role": "user", "content": "一"}, {"role": "assistant", "content": "\n\n二"},
                    {"role": "user", "content": "三"}, {"role": "assistant", "content": "\n四……"},
                    {"role": "user", "content": "五"}, {"role": "assistant", "content": "六"}]
    ids, labels = INTERNLM2_CHAT.encode(conversation, tok)
    for turn in (2, 4, 6):  # each question, with everything before it
        prompt = INTERNLM2_CHAT.prompt_ids(conversation[:turn], tok)
        assert ids[: len(prompt)] == prompt
        answer = conversation[turn]["content"]
        assert ids[len(prompt): len(prompt) + len(sp.encode(answer)) + 1] == [*sp.encode(answer), 92542]
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(trained) == "\n\n二<|im_end|>\n四……<|im_end|>六<|im_end|>"
    assert tok.decode(ids) == INTERNLM2_CHAT.render(conversation, "<s>")[0]


def test_segments_tokenize_each_piece_like_sentencepiece(tok, sp):
    """With no dummy prefix, a segment's ids are sentencepiece's ids of the segment alone,
    whatever its neighbours (BPE merges that do not cross a cut do not depend on them)."""
    rng = random.Random(1)
    text = "".join(TEXTS.values())
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 6)))
        segments = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        encoded = encode_segments(tok, segments)
        assert encoded == [sp.encode(s) for s in segments]


# --- chat streaming ----------------------------------------------------------------------


class _Recorder(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


STREAMED = ["我不知道……也许明天再说吧。𠮷野家的牛丼🍜很好吃——真的！",
            "\n\n第一段：𪚥𪚥龘😀\n\n第二段 with English 👍🏽 and ＡＢＣ……\n```\nprint('𠀀')\n```",
            "😀😀😀", "emoji 😀 then 中文𠀀 end 🎉"]


@pytest.mark.parametrize("answer", STREAMED)
def test_chat_stream_prints_whole_characters_and_the_final_answer(answer, tok, sp):
    ids = [*sp.encode(answer), 92542]
    assert any(sp.is_byte(i) for i in ids)  # some character spans several tokens
    out = _Recorder()
    printer = _Printer(tok, out)
    printer.streamer.put(torch.tensor([sp_markup_ids(sp, "<s><|im_start|>user\n讲<|im_end|>\n")]))
    for token in ids:
        printer.streamer.put(torch.tensor([token]))
    printer.streamer.end()
    final = tok.decode(ids, skip_special_tokens=True).strip()  # what generate() returns
    assert final == answer.strip()
    assert out.getvalue() == final
    assert not any("\ufffd" in text for text in out.writes)
    assert printer.tokens == len(ids)
