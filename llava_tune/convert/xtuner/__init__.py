"""XTuner's LLaVA artifacts <-> llava-tune run dirs.

XTuner's LLaVA on InternLM2 saves ``projector/`` (its ProjectorModel: Linear, GELU, Linear under
``model.*``, the keys our Projector uses) and ``llm_adapter/``: a PEFT LoRA adapter on InternLM2's
own module names (``attention.wqkv``, ``attention.wo``, ``feed_forward.w1/w2/w3``, maybe
``output``). We train a transformers Llama with q/k/v/o_proj, gate/up/down_proj and lm_head, so
the adapter is renamed and ``wqkv``'s LoRA split or packed by rows exactly like the base weight
(per key-value head: G query heads, then the key head, then the value head; see
``convert/internlm2.py`` and, for LoRA arithmetic, ``convert/lora.py``).
"""


from llava_tune.convert.xtuner.exporter import write_xtuner
from llava_tune.convert.xtuner.importer import import_xtuner, is_xtuner_dir

__all__ = ["import_xtuner", "is_xtuner_dir", "write_xtuner"]
