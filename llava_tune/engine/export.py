"""Write a run in other layouts: its merged LLM as transformers Llama (`llm`) or InternLM2
(`internlm2`), the whole model as transformers Llava (`hf-llava`), or XTuner's (`xtuner`)."""

from __future__ import annotations

from pathlib import Path

import peft

from llava_tune.engine.build import read_run_config
from llava_tune.engine.hf_llava import export_hf_llava
from llava_tune.engine.xtuner import export_xtuner
from llava_tune.errors import UserError
from llava_tune.files import atomic_dir
from llava_tune.models.internlm2 import save_internlm2_checkpoint
from llava_tune.models.llm import load_llm

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def merged_llm(run_dir: Path, base: str | Path | None = None):
    """The run's LLM in full precision with any LoRA merged in: (model, tokenizer, base dir).

    LoRA is merged into the original base weights, not the 4-bit ones it trained against,
    so nothing of the quantization error is baked into the export.
    """
    config = read_run_config(run_dir)
    base_dir = Path(base or config.model.llm)
    if (run_dir / "llm").is_dir():
        model, tokenizer = load_llm(run_dir / "llm", device="cpu")
    else:
        if not base_dir.is_dir():
            raise UserError(f"the base LLM of {run_dir} ({base_dir}) is gone; pass --base")
        model, tokenizer = load_llm(base_dir, device="cpu")
        if (run_dir / "llm_adapter").is_dir():
            model = peft.PeftModel.from_pretrained(model, run_dir / "llm_adapter").merge_and_unload()
    return model, tokenizer, base_dir


def export(run_dir: str | Path, out_dir: str | Path, fmt: str, base: str | Path | None = None) -> Path:
    """Export the run's (merged) LLM; returns `out_dir`. Written atomically."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if fmt == "xtuner":
        return export_xtuner(run_dir, out_dir, base=base)
    model, tokenizer, base_dir = merged_llm(run_dir, base)
    if fmt == "llm":
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    elif fmt == "hf-llava":
        export_hf_llava(run_dir, out_dir, model, tokenizer)
    elif fmt == "internlm2":
        if not (base_dir / "tokenizer.model").is_file():
            raise UserError(f"the internlm2 format needs InternLM2's tokenizer.model, which the "
                            f"base LLM {base_dir} lacks; export with --format llm instead")
        tokenizer_files = [base_dir / name for name in TOKENIZER_FILES if (base_dir / name).is_file()]
        save_internlm2_checkpoint(model.state_dict(), model.config, out_dir, tokenizer_files)
    else:
        raise UserError(f"unknown export format {fmt!r}; use llm, internlm2, hf-llava or xtuner")
    return out_dir
