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


KERNEL_HUB_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
"""How bitsandbytes' import-time warning begins when it cannot fetch an optional CPU kernel
from a model hub (it suggests trust_remote_code=True, which llava-tune never needs)."""


def _drop_kernel_hub_notice() -> None:
    """Drop that one warning, wherever bitsandbytes is first imported (peft imports it):
    llava-tune downloads nothing at run time, so the notice only misleads. Other warnings and
    errors of bitsandbytes still show."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KERNEL_HUB_NOTICE)

    # The logger bitsandbytes' CPU backend logs with; a filter on a logger sees only its own
    # records, so it goes on that one (created here if bitsandbytes is not imported yet).
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(keep)


_drop_kernel_hub_notice()


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llava_tune' has no attribute {name!r}")
