"""InternLM2's sentencepiece `tokenizer.model` as a fast (tokenizers) tokenizer.

Fast tokenizers give offsets (for loss masks) and speed; sentencepiece BPE converts exactly:
the merges follow from the pieces' ranks, and byte fallback is a decoder step.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from llava_tune.errors import UserError
from llava_tune.files import read_json


def read_tokenizer_config(path: Path) -> dict:
    """tokenizer_config.json of a checkpoint folder, {} when absent."""
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return {}
    return read_json(file, "tokenizer config", "restore it from the original model")


def _bpe_merges(vocab: dict[str, int], skip: frozenset[int] = frozenset()) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece BPE vocab: every split of a piece into two
    pieces, ranked by the merged piece's id (sentencepiece orders BPE pieces by merge rank).
    Pieces whose id is in `skip` are never produced by a merge."""
    ranked = []
    for piece, piece_id in vocab.items():
        if piece_id in skip:
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                ranked.append((piece_id, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_to_fast(path: Path) -> PreTrainedTokenizerFast:
    """Build a fast tokenizer that encodes exactly like sentencepiece's `tokenizer.model`.

    Pieces that `tokenizer_config.json`'s `added_tokens_decoder` renames (InternLM2 publishes
    `<|im_end|>` as the unused piece `[UNUSED_TOKEN_145]`) take their new names at the same ids.
    The dummy prefix is prepended per text span between special tokens, as InternLM2's own
    tokenizers do. Control pieces and the tokens `added_tokens_decoder` marks `"special": true`
    are special; the other user-defined pieces (InternLM2's "……", "——", full-width letters)
    are matched whole like special tokens but decode as text with skip_special_tokens=True.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    model_file = path / "tokenizer.model"
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as err:  # protobuf raises its own DecodeError type
        raise UserError(f"{model_file} is not a sentencepiece model ({err})") from err
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise UserError(f"{model_file} is not a BPE sentencepiece model; only BPE (as InternLM2) is supported")

    tok_config = read_tokenizer_config(path)
    declared = tok_config.get("added_tokens_decoder", {})
    renamed = {int(i): entry["content"] for i, entry in declared.items()}
    pieces = [renamed.get(i, p.piece) for i, p in enumerate(proto.pieces)]
    # Pieces sentencepiece never emits when encoding (UNUSED ones, and a NUL piece under
    # byte fallback: NUL encodes as <0x00>) still decode to their text. They get a name the
    # BPE model cannot reach (no merge builds it, and it is longer than one character) and the
    # decoder maps that name back to the piece's text.
    unreachable = {
        i: p.piece for i, p in enumerate(proto.pieces)
        if i not in renamed and (p.type == p.UNUSED
                                 or (p.piece == "\0" and proto.trainer_spec.byte_fallback))
    }
    for i in unreachable:
        pieces[i] = f"<unused piece {i}>"  # sentencepiece pieces never hold a plain space
    vocab = {piece: i for i, piece in enumerate(pieces)}
    unk = pieces[proto.trainer_spec.unk_id]

    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=_bpe_merges(vocab, frozenset(unreachable)), unk_token=unk,
                   fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback)
    )
    spaces = [normalizers.Replace(" ", "▁")]
    if proto.normalizer_spec.add_dummy_prefix:
        spaces.insert(0, normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(spaces)
    strip = [decoders.Strip(" ", 1, 0)] if proto.normalizer_spec.add_dummy_prefix else []
    unused = [decoders.Replace(pieces[i], text) for i, text in unreachable.items()]
    backend.decoder = decoders.Sequence(
        [*unused, decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    # Both kinds are matched whole before BPE, as sentencepiece matches user-defined pieces.
    # Only control tokens are special (dropped by decode(skip_special_tokens=True)); user-defined
    # pieces that are text (InternLM2's "……", "——", full-width letters) decode as text.
    control = {i for i, p in enumerate(proto.pieces) if p.type in (p.CONTROL, p.UNKNOWN)}
    control |= {int(i) for i, entry in declared.items() if entry.get("special", False)}
    user_defined = {i for i, p in enumerate(proto.pieces) if p.type == p.USER_DEFINED}
    text_ids = (user_defined | set(renamed)) - control
    backend.add_special_tokens(
        [AddedToken(pieces[i], special=True, normalized=False) for i in sorted(control)]
    )
    backend.add_tokens(
        [AddedToken(pieces[i], special=False, normalized=False) for i in sorted(text_ids)]
    )

    bos = tok_config.get("bos_token", pieces[proto.trainer_spec.bos_id])
    eos = tok_config.get("eos_token", pieces[proto.trainer_spec.eos_id])
    bos = bos["content"] if isinstance(bos, dict) else bos
    eos = eos["content"] if isinstance(eos, dict) else eos
    if tok_config.get("add_bos_token", True):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    pad = tok_config.get("pad_token")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad["content"] if isinstance(pad, dict) else pad,
        chat_template=tok_config.get("chat_template"),
        model_max_length=tok_config.get("model_max_length", 32768),
        clean_up_tokenization_spaces=False,
    )
    return tokenizer
