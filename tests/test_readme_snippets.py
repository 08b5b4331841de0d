"""The README's Python snippets run as written: every name they use is imported or assigned
before its use (a static check; tests/test_export.py runs the hf-llava code itself)."""

from __future__ import annotations

import ast
import builtins
import re
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", README.read_text(), re.S | re.M)
    return [textwrap.dedent(body) for _, body in blocks]


def undefined_names(code: str) -> list[str]:
    """Names read before any import or assignment gives them a value, in source order."""
    defined = set(dir(builtins))
    missing = []
    for node in ast.parse(code).body:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id not in defined:
                missing.append(sub.id)
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Import, ast.ImportFrom)):
                defined.update((a.asname or a.name).split(".")[0] for a in sub.names)
            elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                defined.add(sub.id)
    return missing


@pytest.mark.parametrize("code", python_blocks(), ids=lambda code: code.splitlines()[0][:40])
def test_readme_python_uses_only_names_it_defines(code):
    assert undefined_names(code) == []


def test_the_hf_llava_snippet_is_among_them():
    assert any("LlavaForConditionalGeneration" in code for code in python_blocks())
