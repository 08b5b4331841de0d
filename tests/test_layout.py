"""The source tree's shape: nothing tracked is ignored by .gitignore, and every folder of the
package is a package."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "llava_tune"


def _git(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, input=stdin, capture_output=True, text=True)


def _tracked_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    if _git("rev-parse", "--is-inside-work-tree").stdout.strip() != "true":
        pytest.skip(f"{REPO} is not a git checkout (an unpacked sdist, say)")
    return _git("ls-files").stdout.splitlines()


def test_gitignore_ignores_nothing_tracked():
    """A pattern such as `build/` ignores every folder of that name, inside the package too;
    such a folder's new files would never be committed. Root-only patterns start with /."""
    files = _tracked_files()
    folders = sorted({str(Path(f).parent) + "/" for f in files if Path(f).parent != Path(".")})
    # --no-index: ask the patterns themselves (tracked files are never reported otherwise)
    result = _git("check-ignore", "--no-index", "--verbose", "--stdin", stdin="\n".join(
        folders + files) + "\n")
    assert result.returncode in (0, 1), result.stderr  # 1: nothing matched
    assert result.stdout == "", ("tracked paths that .gitignore matches (anchor the pattern "
                                 "with a leading /):\n" + result.stdout)


def test_every_package_folder_has_an_init():
    folders = {p.parent for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(f.relative_to(REPO)) for f in folders if not (f / "__init__.py").is_file())
    assert not missing, f"package folders without __init__.py: {missing}"


# --------------------------------------------------------------------------- import layers
# The README's Layout section is the map: its code block lists llava_tune's modules and
# folders from the bottom layer up, several on one line being one layer. A module may import
# from its own layer and the layers above it in the list, never from one below, and no two
# modules may import each other round a cycle. Imports under `if TYPE_CHECKING:` are for type
# checkers only and do not count; imports inside functions do.

ENTRY_POINTS = {"llava_tune", "llava_tune.__main__"}
"""The package's front door (the lazy public API, `python -m llava_tune`): above every layer."""


def readme_layers() -> list[list[str]]:
    """[["constants.py", "errors.py", ...], ["launch.py", ...], ..., ["cli/"], ...] from the
    first code block after the README's `## Layout` heading."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Layout\n"):]
    block = section.split("```", 2)[1].splitlines()[1:]
    assert block[0].startswith("llava_tune/"), "the Layout block starts with llava_tune/"
    indent = len(block[1]) - len(block[1].lstrip())
    layers = []
    for line in block[1:]:
        margin = len(line) - len(line.lstrip())
        if margin == 0:  # configs/, scripts/, ...: past the package
            break
        if margin > indent:  # a description's continuation
            continue
        names = line.strip().split("  ")[0].split()
        assert all(n.endswith((".py", "/")) for n in names), f"Layout line {line!r}"
        layers.append(names)
    return layers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
            if "__pycache__" not in p.parts}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The llava_tune modules `path` imports when it runs (top level or in a function)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:  # `from llava_tune import progress` imports a module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: runtime_imports(path, name, modules) for name, path in modules.items()}


def layer_of(module: str, layers: list[list[str]]) -> int:
    top = module.split(".")[1]
    for index, names in enumerate(layers):
        if f"{top}/" in names or f"{top}.py" in names:
            return index
    raise AssertionError(f"{module} is not in the README's Layout; add it to its layer")


def test_readme_layout_lists_every_module_once():
    layers = readme_layers()
    listed = [n for names in layers for n in names]
    assert len(listed) == len(set(listed)), f"listed twice in the Layout: {listed}"
    present = {p.name + "/" if p.is_dir() else p.name for p in PACKAGE.iterdir()
               if (p.is_dir() and (p / "__init__.py").is_file())
               or (p.suffix == ".py" and p.stem not in ("__init__", "__main__"))}
    assert sorted(listed) == sorted(present), "the README's Layout and llava_tune/ differ"


def test_no_module_imports_a_layer_below_it():
    layers = readme_layers()
    upward = []
    for module, imports in import_graph().items():
        if module in ENTRY_POINTS:
            continue
        for imported in sorted(imports - ENTRY_POINTS):
            if layer_of(imported, layers) > layer_of(module, layers):
                upward.append(f"{module} imports {imported} (Layout line "
                              f"{' '.join(layers[layer_of(imported, layers)])})")
    assert not upward, "imports against the README's Layout:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                cycles.append(" -> ".join(path[path.index(imported):] + [imported]))
            elif imported not in state:
                walk(imported, path + [imported])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_function_level_imports_and_skip_type_checking_ones(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "from llava_tune import errors\n"
                      "if TYPE_CHECKING:\n    from llava_tune.config import Config\n"
                      "def f():\n    from llava_tune.data.template import get_template\n")
    modules = package_modules()
    assert runtime_imports(source, "llava_tune.sample", modules) == {
        "llava_tune.errors", "llava_tune.data.template"}
