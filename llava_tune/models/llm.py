"""Load the language model and its tokenizer from a local directory, without remote code.

InternLM2 checkpoints (remote-code format) are converted once into transformers' native Llama
layout and cached; the sentencepiece tokenizer becomes a fast (tokenizers) tokenizer with
InternLM2's chat tokens at the ids its tokenizer_config.json gives.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from llava_tune.errors import UserError
from llava_tune.models.internlm2 import convert_internlm2_dir, is_internlm2_dir

INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""InternLM2-chat's template; the bos_token is part of it, so encode its output without
adding special tokens again."""

QUANTIZATIONS = (None, "4bit", "8bit")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/"auto": bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise UserError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(names)}")
    return names[dtype]


def quantization_config(quantization: str | None, device: torch.device) -> BitsAndBytesConfig | None:
    """NF4 with double quantization for "4bit"; LLM.int8 for "8bit".

    The 4-bit compute dtype is fp32 on the CPU: bf16 backward through 4-bit layers is
    about 80x slower there.
    """
    if quantization is None:
        return None
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=resolve_dtype("auto", device),
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UserError(f"unknown quantization {quantization!r}; use none, 4bit or 8bit")


def _require_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"LLM directory {path} not found; point model.llm at a local checkpoint folder")
    if not (path / "config.json").is_file():
        raise UserError(
            f"{path} has no config.json; it is not a transformers or InternLM2 checkpoint folder"
        )


def _cache_root() -> Path:
    return Path(os.environ.get("LLAVA_TUNE_CACHE", Path.home() / ".cache" / "llava_tune"))


def converted_internlm2_dir(path: Path) -> Path:
    """Where the Llama-layout copy of an InternLM2 checkpoint lives, converting it if needed.

    The cache key covers the folder and the size and mtime of every weight file, so a
    changed checkpoint is converted again.
    """
    path = path.resolve()
    digest = hashlib.sha256(str(path).encode())
    for f in sorted(path.iterdir()):
        if f.suffix in _WEIGHT_SUFFIXES:
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = _cache_root() / "internlm2-as-llama" / f"{path.name}-{digest.hexdigest()[:16]}"
    return convert_internlm2_dir(path, target)


def load_llm(
    path: str | os.PathLike,
    quantization: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a causal LM and its tokenizer from a local checkpoint directory.

    InternLM2 checkpoints load as a native `LlamaForCausalLM` (no remote code); native
    transformers checkpoints load as they are. `quantization` is None, "4bit" (NF4, double
    quantization) or "8bit"; `dtype` None means bf16 on GPUs, fp32 on the CPU.
    """
    path = Path(path)
    _require_model_dir(path)
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    model_dir = converted_internlm2_dir(path) if is_internlm2_dir(path) else path
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except ValueError as err:
        raise UserError(
            f"cannot load {path}/config.json without remote code ({err}); llava-tune supports "
            "InternLM2 and native transformers causal LMs"
        ) from err
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        config=config,
        dtype=torch_dtype,
        quantization_config=quantization_config(quantization, device),
        device_map={"": device},
        trust_remote_code=False,
    )
    return model, load_tokenizer(path)


# --- tokenizer ---------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The tokenizer of a checkpoint folder: `tokenizer.json` if present, else InternLM2's
    sentencepiece `tokenizer.model` converted to a fast tokenizer.

    A missing chat template becomes InternLM2's; a missing pad token becomes EOS.
    """
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    elif (path / "tokenizer.model").is_file():
        tokenizer = sentencepiece_to_fast(path)
    else:
        raise UserError(
            f"no tokenizer in {path}: expected tokenizer.json or tokenizer.model; "
            "copy the tokenizer files of the base model into this folder"
        )
    if tokenizer.chat_template is None:
        tokenizer.chat_template = INTERNLM2_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _read_tokenizer_config(path: Path) -> dict:
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{file} is not valid JSON ({err}); restore it from the original model") from err


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece BPE vocab: every split of a piece into two
    pieces, ranked by the merged piece's id (sentencepiece orders BPE pieces by merge rank)."""
    ranked = []
    for piece, piece_id in vocab.items():
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
    tokenizers do.
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

    tok_config = _read_tokenizer_config(path)
    renamed = {int(i): entry["content"] for i, entry in tok_config.get("added_tokens_decoder", {}).items()}
    pieces = [renamed.get(i, p.piece) for i, p in enumerate(proto.pieces)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    unk = pieces[proto.trainer_spec.unk_id]

    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=_bpe_merges(vocab), unk_token=unk, fuse_unk=True,
                   byte_fallback=proto.trainer_spec.byte_fallback)
    )
    spaces = [normalizers.Replace(" ", "▁")]
    if proto.normalizer_spec.add_dummy_prefix:
        spaces.insert(0, normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(spaces)
    strip = [decoders.Strip(" ", 1, 0)] if proto.normalizer_spec.add_dummy_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    control = {i for i, p in enumerate(proto.pieces) if p.type in (p.CONTROL, p.UNKNOWN)}
    user_defined = {i for i, p in enumerate(proto.pieces) if p.type == p.USER_DEFINED}
    special_ids = sorted(control | user_defined | set(renamed))
    backend.add_special_tokens(
        [AddedToken(pieces[i], special=True, normalized=False) for i in special_ids]
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
