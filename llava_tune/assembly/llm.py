"""Load the language model and its tokenizer from a local directory, without remote code.

InternLM2 checkpoints (remote-code format) are converted once into transformers' native Llama
layout and cached; the sentencepiece tokenizer becomes a fast (tokenizers) tokenizer with
InternLM2's chat tokens at the ids its tokenizer_config.json gives.
"""

from __future__ import annotations

import hashlib
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

from llava_tune.constants import QUANTIZATIONS
from llava_tune.convert.internlm2 import convert_internlm2_dir, is_internlm2_dir
from llava_tune.convert.sentencepiece import sentencepiece_to_fast
from llava_tune.convert.weights import check_weight_file, checkpoint_files
from llava_tune.data.template import INTERNLM2_CHAT
from llava_tune.errors import UserError
from llava_tune.launch import shards_parameters

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
        compute = resolve_dtype("auto", device)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            # ZeRO-3 and FSDP flatten every parameter into one dtype: store the packed 4-bit
            # weights in the compute dtype then (the default uint8 cannot be sharded with it).
            bnb_4bit_quant_storage=compute if shards_parameters() else torch.uint8,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UserError(f"unknown quantization {quantization!r}; use one of "
                    f"{', '.join(map(str, QUANTIZATIONS))}")


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
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            config=config,
            dtype=torch_dtype,
            quantization_config=quantization_config(quantization, device),
            device_map={"": device},
            trust_remote_code=False,
        )
    except Exception:
        # transformers' own error for a truncated download or a pickle is a traceback; ours
        # names the file (a sound checkpoint re-raises the original error: a bug).
        for file in checkpoint_files(model_dir):
            check_weight_file(file)
        raise
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
        tokenizer.chat_template = INTERNLM2_CHAT.jinja
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
