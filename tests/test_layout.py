"""The source tree's shape: nothing tracked is ignored by .gitignore, and every folder of the
package is a package."""

from __future__ import annotations

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
