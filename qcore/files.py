"""Writing files safely and showing untrusted text: shared by the CLI and the app.

Every file qcore writes goes through `write_atomic`: a temporary file in the target's folder, then
`os.replace`, so a crash, Ctrl-C or a full disk never leaves a truncated file where a good one was.
Text that came from outside (a URL, a file name, a file's content) passes through `shorten` before
anyone shows it: one line, bounded length.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

SHORT_TEXT = 60


class OutputPathError(ValueError):
    """An output path that cannot or must not be written; the message is one line."""


def shorten(text: object, limit: int = SHORT_TEXT) -> str:
    """`text` as one line of at most `limit` characters (an ellipsis marks a cut); control
    characters and line breaks become spaces so nothing can fake a second message line."""
    flat = "".join(ch if ch.isprintable() else " " for ch in str(text))
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def check_output_path(path: str | os.PathLike[str], force: bool) -> Path:
    """Fail before any work if `path` cannot be written: its folder must exist and be writable,
    and an existing file is replaced only with `force`."""
    target = Path(path)
    shown = shorten(target)
    if target.name in ("", ".", ".."):
        raise OutputPathError(f"{shown}: not a file name")
    folder = target.parent
    if not folder.is_dir():
        raise OutputPathError(f"{shown}: the folder {shorten(folder)} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{shown}: the folder {shorten(folder)} is not writable")
    if target.is_dir():
        raise OutputPathError(f"{shown} is a folder, not a file")
    if target.exists() and not force:
        raise OutputPathError(f"{shown} exists; pass --force to replace it")
    return target


def _write_all(handle_fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(handle_fd, view)
        view = view[written:]


def _mode_for(target: Path) -> int:
    """The replaced file's permissions, or those of a new file under the current umask."""
    if target.exists():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` all or nothing: on any failure (full disk, Ctrl-C) the temporary file
    is removed and whatever was at `path` before is untouched."""
    target = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        try:
            os.fchmod(descriptor, _mode_for(target))  # mkstemp makes 0600; keep what a plain write would give
            _write_all(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, target)
    except BaseException:  # KeyboardInterrupt included: never leave the half-written temporary behind
        Path(temporary).unlink(missing_ok=True)
        raise
