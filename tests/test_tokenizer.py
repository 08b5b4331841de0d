"""sentencepiece -> fast tokenizer: same ids as sentencepiece, InternLM2's renamed chat tokens.

The sentencepiece model is trained here, laid out like InternLM2's: BPE with byte fallback,
identity normalization, a dummy prefix, and the chat tokens published as unused pieces that
tokenizer_config.json's `added_tokens_decoder` renames.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm

from llava_tune.assembly.llm import load_tokenizer
from llava_tune.convert.sentencepiece import sentencepiece_to_fast
from llava_tune.data.template import INTERNLM2_CHAT
from llava_tune.errors import UserError

WORDS = ("the quick brown fox jumps over a lazy dog while red green blue circles and squares "
         "shape color picture image what which is it this that hello world answer question "
         "你好 世界 中文 图片 颜色 形状 红色 的 是 这 一个").split()
UNUSED = ("[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]")
RENAMED = {"[UNUSED_TOKEN_145]": "<|im_end|>", "[UNUSED_TOKEN_146]": "<|im_start|>"}
PROBE_CHARS = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()\"/"
               "     \n\n\t你好世界中文图片颜色的是一个猫狗éüßñ😀🎉👍🏽\u00a0\u200b√∑€")


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def train_sp(out: Path, add_dummy_prefix: bool = True, model_type: str = "bpe") -> Path:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, model_type=model_type,
        vocab_size=600, hard_vocab_limit=False, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=list(UNUSED),
        num_threads=1, minloglevel=2,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    added = {
        str(sp.piece_to_id(old)): {"content": new, "lstrip": False, "normalized": False,
                                   "rstrip": False, "single_word": False, "special": True}
        for old, new in RENAMED.items()
    }
    config = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
              "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
              "tokenizer_class": "InternLM2Tokenizer", "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def probes(n: int = 150, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "  leading spaces", "trailing spaces  ", "\nleading newline",
             "multiple   spaces\n\nand lines\r\n", "中文 😀 émoji", "the quick brown fox",
             " the quick brown fox", "1234567890", "👍🏽👍🏽"]
    for _ in range(n):
        if rng.random() < 0.5:
            text = "".join(rng.choice(PROBE_CHARS) for _ in range(rng.randint(1, 40)))
        else:
            text = rng.choice(["", " ", "\n"]).join(
                rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        texts.append(text)
    return texts


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return train_sp(tmp_path_factory.mktemp("sp") / "bpe")


@pytest.fixture(scope="module")
def sp(tok_dir) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_chat_tokens_take_the_renamed_ids(tok, sp):
    im_end, im_start = sp.piece_to_id(UNUSED[0]), sp.piece_to_id(UNUSED[1])
    assert (im_end, im_start) == (3, 4)  # after <unk> <s> </s>, like the real 92542/92543
    assert tok.convert_tokens_to_ids("<|im_end|>") == im_end
    assert tok.convert_tokens_to_ids("<|im_start|>") == im_start
    assert tok.convert_ids_to_tokens([im_end, im_start]) == ["<|im_end|>", "<|im_start|>"]
    assert UNUSED[0] not in tok.get_vocab() and UNUSED[1] not in tok.get_vocab()
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [im_end]
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [im_start]
    ids = tok.encode("red<|im_end|>blue<|im_start|>", add_special_tokens=False)
    # Each span between special tokens is a sentencepiece input of its own (dummy prefix).
    assert ids == [*sp.encode("red"), im_end, *sp.encode("blue"), im_start]
    assert len(tok) == sp.get_piece_size()


def test_special_token_ids(tok, sp):
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<unk>", "<s>", "</s>", "</s>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.eos_id())


def test_plain_text_encodes_like_sentencepiece_and_round_trips(tok, sp):
    for text in probes():
        expected = sp.encode(text)
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == expected, text
        assert tok.decode(ids) == text, text
        assert sp.decode(ids) == text, text
    # The corpus itself encodes to merged pieces, not bytes (the merges are used).
    text = corpus(1, seed=5)[0]
    assert len(tok.encode(text, add_special_tokens=False)) < len(text) // 2


def test_bos_added_once_no_eos(tok, sp):
    text = "hello world 你好"
    assert tok(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)]
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert tok("")["input_ids"] == [sp.bos_id()]


def test_chat_template_renders_internlm2_format(tok, sp):
    assert tok.chat_template == INTERNLM2_CHAT.jinja
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "what color"},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "which shape"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<s><|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nwhat color<|im_end|>\n"
                    "<|im_start|>assistant\nred<|im_end|>\n"
                    "<|im_start|>user\nwhich shape<|im_end|>\n<|im_start|>assistant\n")
    without = tok.apply_chat_template(messages[:3], tokenize=False)
    assert without.endswith("red<|im_end|>\n")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids.count(sp.bos_id()) == 1
    assert ids == tok(text, add_special_tokens=False)["input_ids"]


def test_chat_template_from_config_is_kept(tmp_path, tok_dir):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ 'custom' }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(folder).chat_template == "{{ 'custom' }}"


def test_save_pretrained_round_trip(tmp_path, tok, sp):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path)
    texts = probes(40, seed=7) + ["<|im_start|>user\nhi<|im_end|>\n", "a<|im_end|>b"]
    for text in texts:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"], text
        ids = loaded.encode(text, add_special_tokens=False)
        assert loaded.decode(ids) == tok.decode(ids)
    for text in probes(40, seed=7):
        assert loaded.encode(text, add_special_tokens=False) == sp.encode(text)
    assert loaded.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"]) == [3, 4]
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "</s>")
    assert loaded.chat_template == tok.chat_template
    # Loaded from tokenizer.json: the sentencepiece model is not there to fall back on.
    assert not (tmp_path / "tokenizer.model").exists()


def test_without_dummy_prefix(tmp_path):
    folder = train_sp(tmp_path / "nodummy", add_dummy_prefix=False)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = sentencepiece_to_fast(folder)
    for text in probes(60, seed=3):
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == text, text


def test_missing_tokenizer_names_the_folder(tmp_path):
    folder = tmp_path / "no-tokenizer-here"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no-tokenizer-here") as err:
        load_tokenizer(folder)
    assert "tokenizer.json or tokenizer.model" in str(err.value)


def test_bad_tokenizer_files_are_user_errors(tmp_path, tok_dir):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "tokenizer.model").write_bytes(b"this is not a protobuf \xff\xff\xff")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        load_tokenizer(garbage)

    unigram = train_sp(tmp_path / "unigram", model_type="unigram")
    with pytest.raises(UserError, match="not a BPE sentencepiece model"):
        load_tokenizer(unigram)

    broken = tmp_path / "broken-config"
    broken.mkdir()
    (broken / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(broken)
