"""Files: atomic writes (a file or folder appears complete under its name, or not at all) and
JSON reading with errors that name the file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llava_tune.errors import UserError


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `target`; when the block succeeds it replaces `target`.

    POSIX cannot swap folders in one step, so an old `target` is renamed aside first:
    readers see the old folder, the new one or briefly none, never a half-written one. On an
    exception the temp folder is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, so the final rename stays on one filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the published folder private to this user
    try:
        yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def read_json(file: str | os.PathLike, what: str = "", fix: str = "restore or re-download it") -> dict:
    """A JSON object from `file`; a missing, non-UTF-8, invalid or non-object file raises
    UserError naming the file, `what` it is and the `fix`."""
    file = Path(file)
    label = f"{what} {file}" if what else str(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{label} not found; {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{label} is not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{label} is not valid JSON (line {err.lineno}, column {err.colno}: "
                        f"{err.msg}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{label} must hold a JSON object; {fix}")
    return data
