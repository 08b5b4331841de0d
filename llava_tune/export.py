"""Write a finished run in other layouts: its merged LLM as transformers Llama (`llm`) or
InternLM2 (`internlm2`), the whole model as transformers Llava (`hf-llava`) or, for anyres
runs, LlavaNext (`hf-llava-next`), or XTuner's LLaVA folders (`xtuner`).

Exports never destroy: a target inside the run (or the run inside the target) is refused, a
non-empty target needs `force`, and even then only a previous export's own files are replaced;
a folder holding anything else is moved aside, never deleted.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from llava_tune import rundir
from llava_tune.assembly.model import (
    ModelBundle,
    build_tower,
    image_layout,
    load_full_tower,
    load_run,
    recorded_base,
)
from llava_tune.convert.hf_llava import check_kind, write_hf_llava
from llava_tune.convert.internlm2 import remote_code_files, write_internlm2_checkpoint
from llava_tune.convert.vision_lora import write_clip_tower
from llava_tune.convert.xtuner import write_xtuner
from llava_tune.errors import UserError
from llava_tune.files import honour_umask
from llava_tune.stages import has_vision

FORMATS = ("llm", "internlm2", "hf-llava", "hf-llava-next", "hf-llava-onevision", "xtuner")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
MARKER = "llava_tune_export.json"
"""Written into every export: which run, which format, which files (so --force knows what it
may replace)."""


@dataclass
class ExportResult:
    path: Path
    moved_aside: Path | None = None
    """Where the target's previous contents went (a folder that was not our export)."""
    notes: list[str] = field(default_factory=list)
    """What the user should know about the export (e.g. files it could not include)."""


def export(run_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str,
           base: str | os.PathLike | None = None, force: bool = False) -> ExportResult:
    """Export a finished run; `out_dir` appears complete or not at all.

    The export is written into a temp folder beside `out_dir`, which replaces `out_dir` only
    once it is complete: a failed export leaves `out_dir` as it was.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    check_target(run_dir, out_dir, force)
    config = rundir.read_run_config(run_dir)
    rundir.check_complete(run_dir)
    hf = functools.partial(_write_hf_llava, fmt=fmt)
    writers = {"llm": _write_llm, "internlm2": _write_internlm2, "hf-llava": hf,
               "hf-llava-next": hf, "hf-llava-onevision": hf, "xtuner": _write_xtuner}
    _check_format_holds(config, fmt)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, so the final rename stays on one filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        notes = writers[fmt](run_dir, tmp, base, config) or []
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        (tmp / MARKER).write_text(json.dumps({"run_dir": str(run_dir.resolve()), "format": fmt,
                                              "files": files}, indent=2) + "\n")
        honour_umask(tmp)
        previous, moved = _clear_target(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)  # our own earlier export, replaced
    return ExportResult(out_dir, moved, notes)


def check_target(run_dir: Path, out_dir: Path, force: bool) -> None:
    """Refuse, before anything is loaded, a target that overlaps the run, is a file, or is a
    non-empty folder (unless `force`)."""
    run, out = run_dir.resolve(), out_dir.resolve()
    if out == run or run in out.parents or out in run.parents:
        raise UserError(f"export target {out_dir} overlaps the run {run_dir}; write the export "
                        "to a folder outside the run dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"export target {out_dir} is a file; give a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(f"export target {out_dir} is not empty; choose a new folder, or pass "
                        "--force to replace it (a previous export is replaced; other contents "
                        "are moved aside, never deleted)")


def _clear_target(out_dir: Path) -> tuple[Path | None, Path | None]:
    """Make room for the new export at `out_dir`: returns (a previous export of ours, moved to
    a temp name for deletion, or None; the folder that held anything else, moved aside and
    kept, or None)."""
    if not out_dir.exists():
        return None, None
    if not any(out_dir.iterdir()):
        out_dir.rmdir()  # empty: nothing to keep
        return None, None
    marker = out_dir / MARKER
    if marker.is_file():
        try:
            ours = set(json.loads(marker.read_text(encoding="utf-8"))["files"]) | {MARKER}
        except (ValueError, KeyError, TypeError):
            ours = set()
        present = {str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if not p.is_dir()}
        if present <= ours:
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            return old, None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        aside = out_dir.with_name(f"{out_dir.name}.replaced-{stamp}" + (f"-{n}" if n else ""))
        if not aside.exists():
            os.replace(out_dir, aside)
            return None, aside
    raise UserError(f"too many {out_dir.name}.replaced-* folders beside {out_dir}; remove some")


def merged_model(run_dir: Path, base) -> ModelBundle:
    """The run in full precision on the CPU with every LoRA merged into its weights: the
    original base weights, not the 4-bit ones it trained against, so nothing of the
    quantization error is baked into the export."""
    bundle = load_run(run_dir, base=base, quantization=None, device="cpu")
    model = bundle.model
    if hasattr(model.llm, "merge_and_unload"):
        model.llm = model.llm.merge_and_unload()
    if model.vision is not None and hasattr(model.vision.visual, "merge_and_unload"):
        model.vision.visual = model.vision.visual.merge_and_unload()
    return bundle


def _write_llm(run_dir: Path, folder: Path, base, config) -> None:
    bundle = merged_model(run_dir, base)
    bundle.model.llm.save_pretrained(folder)
    bundle.tokenizer.save_pretrained(folder)


def _write_internlm2(run_dir: Path, folder: Path, base, config) -> list[str]:
    """The merged LLM in InternLM2's layout, with the base's tokenizer and remote code; notes
    naming the remote code the base lacks."""
    base_dir = recorded_base(run_dir, config, base)
    if not (base_dir / "tokenizer.model").is_file():
        raise UserError(f"the internlm2 format needs InternLM2's tokenizer.model, which the "
                        f"base LLM {base_dir} lacks; export with --format llm instead")
    bundle = merged_model(run_dir, base)
    llm = bundle.model.llm
    tokenizer_files = [base_dir / name for name in TOKENIZER_FILES if (base_dir / name).is_file()]
    stop_ids = bundle.tokenizer.convert_tokens_to_ids(list(bundle.template.stop_words))
    write_internlm2_checkpoint(llm.state_dict(), llm.config, folder, tokenizer_files,
                               stop_token_ids=[i for i in stop_ids if i is not None
                                               and i != bundle.tokenizer.unk_token_id])
    # config.json's auto_map (and the tokenizer's) name InternLM2's remote code, which
    # published checkpoints carry: with it, the export loads with trust_remote_code=True.
    missing = []
    for name in remote_code_files(folder):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, folder / name)
        else:
            missing.append(name)
    if not missing:
        return []
    return [f"the export's auto_map names {', '.join(missing)}, which the base LLM {base_dir} "
            "does not have; transformers' AutoModelForCausalLM.from_pretrained(..., "
            "trust_remote_code=True) needs them: copy them from the published InternLM2 "
            "checkpoint into the export (llava-tune loads it without them)"]


def _check_format_holds(config, fmt: str) -> None:
    """Refuse, before anything loads, a format that cannot hold how the run reads images
    (naming the format that can)."""
    if not has_vision(config) or fmt in ("llm", "internlm2"):
        return
    if fmt.startswith("hf-"):
        check_kind(_hf_kind(fmt), image_layout(config))
    if fmt == "xtuner" and config.model.image_aspect == "anyres":
        raise UserError("this run reads images as anyres tiles (model.image_aspect=anyres), "
                        "which XTuner's LLaVA cannot; export it with --format hf-llava-next")


def _hf_kind(fmt: str) -> str:
    """hf-llava-next -> llava_next: transformers' model_type (convert/hf_llava.py's KINDS)."""
    return fmt.removeprefix("hf-").replace("-", "_")


def _write_hf_llava(run_dir: Path, folder: Path, base, config, fmt: str) -> None:
    if not has_vision(config):
        raise UserError(f"{run_dir} is a text-only run; export it with --format llm")
    bundle = merged_model(run_dir, base)
    model = bundle.model
    write_hf_llava(folder, model.llm, bundle.tokenizer, model.vision, model.projector,
                   model.layout, _hf_kind(fmt))


def _write_xtuner(run_dir: Path, folder: Path, base, config) -> None:
    vision = config.model.vision
    write_xtuner(run_dir, folder, recorded_base(run_dir, config, base),
                 vision_base=vision.pretrained or vision.name)
    if (run_dir / rundir.VISION).is_dir():
        # A fully trained tower: XTuner's visual_encoder/ (a CLIPVisionModel folder).
        tower = build_tower(config.model)
        load_full_tower(tower, run_dir / rundir.VISION)
        write_clip_tower(tower.base, folder / "visual_encoder")
