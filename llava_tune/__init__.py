"""llava-tune: give an InternLM2 chat model eyes (LLaVA-style pretrain + QLoRA finetune)."""

import logging

# bitsandbytes announces on import that an optional CPU kernel could not be fetched from a
# model hub; llava-tune never downloads at run time, so that notice only misleads.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from llava_tune.engine.build import load_run  # noqa: E402
from llava_tune.models.llm import load_llm  # noqa: E402

__all__ = ["load_llm", "load_run"]
__version__ = "0.1.0"
