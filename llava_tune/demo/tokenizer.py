"""Train a small byte-fallback sentencepiece tokenizer laid out like InternLM2's.

The demo's tiny language model needs a tokenizer that behaves like InternLM2's (a sentencepiece
BPE model with byte fallback, ``<unk>``/``<s>``/``</s>`` at ids 0/1/2, the six chat tokens as
single pieces, BOS added and EOS not) but with a vocabulary of a few hundred pieces. Any UTF-8
text round-trips losslessly (encode, then decode, gives the same string), with sentencepiece's
one exception: the character U+2581 (the whitespace marker) decodes as a space.

Files written by :func:`train_tokenizer` (InternLM2's layout, without its remote code):

    tokenizer.model            sentencepiece model
    tokenizer_config.json      add_bos/add_eos, special tokens, added_tokens_decoder, chat_template
    special_tokens_map.json    bos/eos/unk/pad and the chat tokens

Usage: ``python -m llava_tune.demo.tokenizer --text-json data.json [more ...] --out DIR [--vocab-size N]``
"""

from __future__ import annotations

import argparse
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from llava_tune.constants import IMAGE_TOKEN
from llava_tune.data.template import INTERNLM2_CHAT
from llava_tune.files import write_bytes_atomic, write_text_atomic

CHAT_TOKENS: tuple[str, ...] = (
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
)
"""InternLM2's chat tokens in id order (92538..92543 in the published model; 3..8 here)."""

ADDITIONAL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|im_start|>",
    "<|im_end|>",
    "<|action_start|>",
    "<|action_end|>",
    "<|interpreter|>",
    "<|plugin|>",
)
"""The chat tokens in the order InternLM2's config lists them as additional special tokens."""

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
"""Special pieces at ids 0, 1 and 2."""

PAD_TOKEN = EOS_TOKEN
"""Padding token, as in InternLM2's tokenizer_config.json."""

CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")
"""Role names the chat template writes; :func:`main` adds them to the training text."""

ROUND_TRIP_PROBES: tuple[str, ...] = (
    "",
    "A red circle.",
    "  leading, trailing and  multiple   spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "中文 😀 émoji \u00a0 \u200b",
    "<|im_start|>user\nWhat color is the shape?<|im_end|>\n<|im_start|>assistant\n",
)
"""Strings checked to round-trip after training."""


def _write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """Yield the non-empty lines of ``texts`` (sentencepiece trains on single lines)."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def tokenizer_config(sp: spm.SentencePieceProcessor) -> dict[str, Any]:
    """Return InternLM2-style ``tokenizer_config.json`` contents for the model ``sp``."""
    added = {}
    for token in sorted(CHAT_TOKENS, key=sp.piece_to_id):
        added[str(sp.piece_to_id(token))] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": BOS_TOKEN,
        "chat_template": INTERNLM2_CHAT.jinja,
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": UNK_TOKEN,
    }


def special_tokens_map() -> dict[str, Any]:
    """Return InternLM2-style ``special_tokens_map.json`` contents."""
    return {
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
    }


def check_tokenizer(sp: spm.SentencePieceProcessor) -> None:
    """Raise ``RuntimeError`` unless ``sp`` has InternLM2's special ids and round-trips the probes."""
    expected = {UNK_TOKEN: 0, BOS_TOKEN: 1, EOS_TOKEN: 2}
    for piece, index in expected.items():
        if sp.id_to_piece(index) != piece:
            raise RuntimeError(f"id {index} is {sp.id_to_piece(index)!r}, expected {piece!r}")
    for token in CHAT_TOKENS:
        ids = sp.encode(token, add_bos=False)
        if sp.piece_to_id(token) == sp.unk_id() or sp.piece_to_id(token) not in ids:
            raise RuntimeError(f"chat token {token!r} is not a single piece: {ids}")
    for probe in ROUND_TRIP_PROBES:
        decoded = sp.decode(sp.encode(probe))
        if decoded != probe:
            raise RuntimeError(f"round trip failed: {probe!r} -> {decoded!r}")


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike[str],
    vocab_size: int = 512,
) -> Path:
    """Train a byte-fallback BPE sentencepiece model on ``texts`` and write it in InternLM2's layout.

    Args:
        texts: training text; each string is split into lines, empty lines are skipped.
        out_dir: folder to write ``tokenizer.model``, ``tokenizer_config.json`` and
            ``special_tokens_map.json`` into (created if missing).
        vocab_size: target vocabulary size, including the 3 special pieces, the 6 chat tokens
            and the 256 byte pieces; a small corpus may give fewer pieces.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    reserved = 3 + len(CHAT_TOKENS) + 256
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size must be > {reserved} (special, chat and byte pieces)")
    sentences = list(_sentences(texts))
    if not sentences:
        raise ValueError("no training text")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece=UNK_TOKEN,
        bos_piece=BOS_TOKEN,
        eos_piece=EOS_TOKEN,
        user_defined_symbols=list(CHAT_TOKENS),
        num_threads=1,
        minloglevel=2,
    )
    proto = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    check_tokenizer(sp)
    out = Path(out_dir)
    write_bytes_atomic(out / "tokenizer.model", proto)
    _write_json_atomic(out / "tokenizer_config.json", tokenizer_config(sp))
    _write_json_atomic(out / "special_tokens_map.json", special_tokens_map())
    return out


def llava_texts(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    """Yield every ``value`` of LLaVA records' conversations, with ``<image>`` removed and stripped."""
    for record in records:
        for turn in record.get("conversations", []):
            value = turn.get("value", "").replace(IMAGE_TOKEN, "").strip()
            if value:
                yield value


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m llava_tune.demo.tokenizer --text-json F [F ...] --out DIR [--vocab-size N]``."""
    parser = argparse.ArgumentParser(description="Train the demo's InternLM2-style tokenizer.")
    parser.add_argument(
        "--text-json", nargs="+", required=True, help="LLaVA JSON files with training text"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--vocab-size", type=int, default=512, help="vocabulary size (default 512)")
    args = parser.parse_args(argv)
    texts: list[str] = []
    turns = 0
    for path in args.text_json:
        with open(path, encoding="utf-8") as handle:
            records = json.load(handle)
        for record in records:
            turns += len(record.get("conversations", []))
        texts.extend(llava_texts(records))
    # Every turn is wrapped by the chat template, so the role names occur once per turn.
    texts.extend(CHAT_ROLES[1 + i % 2] for i in range(turns))
    texts.extend(CHAT_ROLES[:1] * max(1, turns // 20))
    out = train_tokenizer(texts, args.out, vocab_size=args.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    chat_ids = {token: sp.piece_to_id(token) for token in CHAT_TOKENS}
    print(
        json.dumps(
            {"out": str(out), "vocab_size": sp.get_piece_size(), "chat_token_ids": chat_ids},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
