"""Files: atomic writes (a file or folder appears complete under its name, or not at all) and
JSON reading with errors that name the file."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llava_tune.errors import UserError


def current_umask() -> int:
    """The process's umask. Read from /proc where Linux shows it: setting it to read it back
    (the only portable way) would briefly change it for every thread."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a folder and everything in it) the permissions a plain open()
    or mkdir() would have: 0666 (0777 for folders and executables) less the umask.

    Needed before publishing anything written through temp files: tempfile.mkstemp/mkdtemp
    and safetensors' save_file (so every transformers and peft save) create them 0600/0700,
    which would leave a user's weights unreadable to the group the umask shares them with.
    Symbolic links are left alone.
    """
    mask = current_umask()
    path = Path(path)

    def fix(item: Path, folder: bool) -> None:
        if item.is_symlink():
            return
        executable = folder or item.stat().st_mode & 0o100
        os.chmod(item, (0o777 if executable else 0o666) & ~mask)

    if not path.is_dir() or path.is_symlink():
        fix(path, folder=False)
        return
    for root, _, files in os.walk(path):
        fix(Path(root), folder=True)
        for name in files:
            fix(Path(root) / name, folder=False)


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
    try:
        yield tmp
        honour_umask(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def exclusive(target: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock named after `target` (a `.NAME.lock` file beside it) while the
    block runs: several processes that would each build the same `target` (the ranks of one
    launch, say) take turns, so the first builds it and the others find it built.

    The caller checks, inside the block, whether `target` is already built: the lock file is
    removed on the way out, so a process that opened it before may hold the lock on the
    removed file while a later one locks a new file, and only that check keeps them from both
    building. The kernel releases the lock when a holder is killed (its lock file then stays)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # still held: nobody else is inside
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        honour_umask(tmp)
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
