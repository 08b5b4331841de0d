"""Assembling the model: the LLM and its tokenizer loaded from a local checkpoint (llm.py:
load_llm, quantization), the composed LLaVA model of a config, and finished runs loaded back
(model.py)."""
