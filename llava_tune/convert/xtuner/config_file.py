"""XTuner's ``xtuner_config.py``, read as text: the few settings an import needs.

XTuner writes its mmengine config next to the converted LLaVA folders, either as the recipe's
source (``model = dict(type=LLaVAModel, ..., visual_select_layer=-2)``, ``prompt_template =
PROMPT_TEMPLATE.internlm2_chat``) or as mmengine's dump of it (names as dotted strings:
``type='xtuner.model.LLaVAModel'``, ``prompt_template =
'xtuner.utils.PROMPT_TEMPLATE.internlm2_chat'``, or the template spelled out as a dict).

The file is Python, and a downloaded one is untrusted: it is parsed with ``ast`` and never
executed or imported. Only literals, ``dict(...)`` calls, lists, tuples, names of earlier
top-level assignments and dotted names are understood; anything else (arithmetic, other calls)
reads as "unknown", which is never taken as a value.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_tune.errors import UserError

FILE = "xtuner_config.py"


class Unknown:
    """A value the parser does not evaluate (a call other than dict(), arithmetic, ...)."""

    def __repr__(self) -> str:
        return "<unknown>"


UNKNOWN = Unknown()


@dataclass(frozen=True)
class Dotted:
    """A name or attribute chain in the source, e.g. PROMPT_TEMPLATE.internlm2_chat."""

    name: str


# What XTuner's internlm2_chat template is, as mmengine dumps it when it expands the dict.
_INTERNLM2_CHAT = {
    "SYSTEM": "<|im_start|>system\n{system}<|im_end|>\n",
    "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
}


@dataclass
class XtunerSettings:
    """What an import takes from xtuner_config.py; None where the file does not say."""

    file: Path
    projector_depth: int | None = None
    visual_select_layer: int | None = None
    template: str | None = None
    """XTuner's PROMPT_TEMPLATE name (internlm2_chat, vicuna, ...)."""
    visual_encoder: str | None = None
    """The CLIP tower the recipe names (e.g. openai/clip-vit-large-patch14-336)."""
    llm: str | None = None
    visual_encoder_lora: dict[str, Any] | None = None
    token_merge_ratio: int | None = None


def _evaluate(node: ast.AST, names: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand, names)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
        return UNKNOWN
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_evaluate(item, names) for item in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for key, value in zip(node.keys, node.values, strict=True):
            k = _evaluate(key, names) if key is not None else UNKNOWN
            if isinstance(k, str):
                out[k] = _evaluate(value, names)
        return out
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" \
            and not node.args:
        return {kw.arg: _evaluate(kw.value, names) for kw in node.keywords if kw.arg is not None}
    if isinstance(node, ast.Name):
        return names.get(node.id, Dotted(node.id))
    if isinstance(node, ast.Attribute):
        base = node.value
        parts = [node.attr]
        while isinstance(base, ast.Attribute):
            parts.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name):
            return Dotted(".".join([base.id, *reversed(parts)]))
    return UNKNOWN


def parse_assignments(text: str, file: Path) -> dict[str, Any]:
    """Top-level ``name = value`` assignments of a config file, values evaluated as far as the
    module docstring says; raises UserError when the text is not Python."""
    try:
        tree = ast.parse(text, filename=str(file))
    except SyntaxError as err:
        raise UserError(f"{file} is not valid Python (line {err.lineno}: {err.msg}); remove "
                        f"it from the folder or restore XTuner's {FILE}") from None
    names: dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 \
                and isinstance(stmt.targets[0], ast.Name):
            names[stmt.targets[0].id] = _evaluate(stmt.value, names)
    return names


def _template_name(value: Any) -> str | None:
    """XTuner's template name from `PROMPT_TEMPLATE.x`, 'xtuner.utils.PROMPT_TEMPLATE.x' or the
    template dict itself (only internlm2_chat's is recognized by content)."""
    if isinstance(value, Dotted):
        value = value.name
    if isinstance(value, str) and "PROMPT_TEMPLATE." in value:
        return value.rsplit("PROMPT_TEMPLATE.", 1)[1]
    if isinstance(value, dict):
        if all(value.get(k) == v for k, v in _INTERNLM2_CHAT.items()):
            return "internlm2_chat"
        return "(a template dict that is not internlm2_chat's)"
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_xtuner_config(file: str | Path) -> XtunerSettings:
    """The settings of an XTuner LLaVA ``xtuner_config.py`` (see the module docstring)."""
    file = Path(file)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{file} is not UTF-8 text; remove it from the folder or restore "
                        f"XTuner's {FILE}") from None
    names = parse_assignments(text, file)
    settings = XtunerSettings(file)
    model = names.get("model")
    model = model if isinstance(model, dict) else {}
    settings.projector_depth = _int(model.get("projector_depth"))
    settings.visual_select_layer = _int(model.get("visual_select_layer"))
    settings.token_merge_ratio = _int(model.get("token_merge_ratio"))
    template = names.get("prompt_template", model.get("template"))
    settings.template = _template_name(template)

    def pretrained(part: Any) -> str | None:
        path = part.get("pretrained_model_name_or_path") if isinstance(part, dict) else None
        return path if isinstance(path, str) else None

    settings.visual_encoder = pretrained(model.get("visual_encoder")) or (
        names.get("visual_encoder_name_or_path")
        if isinstance(names.get("visual_encoder_name_or_path"), str) else None)
    settings.llm = pretrained(model.get("llm")) or (
        names.get("llm_name_or_path") if isinstance(names.get("llm_name_or_path"), str) else None)
    lora = model.get("visual_encoder_lora")
    if isinstance(lora, dict):
        settings.visual_encoder_lora = {k: v for k, v in lora.items() if k != "type"}
    return settings
