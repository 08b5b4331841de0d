"""llava-tune: give an InternLM2 chat model eyes (LLaVA-style pretrain + QLoRA finetune).

The public API loads lazily, so `import llava_tune` (and `llava-tune --help`) does not
import torch:

    llava_tune.load_llm(path, quantization=None, dtype=None) -> (model, tokenizer)
    llava_tune.load_run(run_dir, base=None, quantization=True)
        -> ModelBundle (.model, .tokenizer, .image_processor, ...)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["load_llm", "load_run"]
__version__ = "0.1.0"

_LAZY = {"load_llm": "llava_tune.assembly.llm", "load_run": "llava_tune.assembly.model"}

if TYPE_CHECKING:
    from llava_tune.assembly.llm import load_llm
    from llava_tune.assembly.model import load_run


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llava_tune' has no attribute {name!r}")
