"""Writing files safely and showing untrusted text: shared by the CLI and the app.

Every file qcore writes goes through `write_atomic`: a temporary file in the target's folder, then
`os.replace`, so a crash, Ctrl-C or a full disk never leaves a truncated file where a good one was.
Text that came from outside (a URL, a file name, a file's content) passes through `shorten` before
anyone shows it: one line, bounded length. JSON that came from a file is read by `read_json` alone,
and whole numbers from text (a URL, an environment variable) by `parse_whole_number` alone.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

SHORT_TEXT = 60
MAX_JSON_DEPTH = 32  # qcore's own files nest 5 deep; Python's parser recurses, so bound it before parsing
MAX_JSON_INT_DIGITS = 20  # every whole number qcore writes fits 64 bits (20 characters with a sign)
_ASCII_DIGITS = re.compile(r"[0-9]{1,20}")


class JsonFileError(ValueError):
    """JSON from a file that qcore refuses to read; the message is one line."""


def parse_whole_number(text: str, low: int, high: int) -> int | None:
    """`text` as an int in [low, high] when it is 1 to 20 ASCII digits, else None. Python's int()
    also takes '+7', ' 7', '7_0' and other scripts' digits ('٧'), and str.isdigit() passes '²',
    which int() then refuses: a setting means plain digits."""
    if not _ASCII_DIGITS.fullmatch(text):
        return None
    value = int(text)
    return value if low <= value <= high else None


def _json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in `text`, strings skipped (one pass, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise JsonFileError(f"a number of {len(text)} digits (at most {MAX_JSON_INT_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonFileError(f"a number beyond float range ({shorten(text, 20)})")
    return value


def _refuse_constant(name: str) -> object:
    raise JsonFileError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    found: dict[str, object] = {}
    for key, value in pairs:
        if key in found:
            raise JsonFileError(f"the key {shorten(key, 30)!r} appears twice")
        found[key] = value
    return found


def read_json(text: object, what: str, max_chars: int) -> object:
    """Parse JSON that came from a file, bounded before any parsing: a string of at most `max_chars`,
    nested at most MAX_JSON_DEPTH deep, whole numbers of at most MAX_JSON_INT_DIGITS digits, finite
    numbers only (no NaN, Infinity or 1e999), no key twice. Anything else raises JsonFileError naming
    `what`, in one line."""
    if not isinstance(text, str):
        raise JsonFileError(f"{what} must be a JSON string (found {type(text).__name__})")
    if len(text) > max_chars:
        raise JsonFileError(f"{what} must be a JSON string of at most {max_chars} characters (found {len(text)})")
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise JsonFileError(f"{what} nests {depth} deep (at most {MAX_JSON_DEPTH})")
    try:
        return json.loads(
            text,
            parse_int=_bounded_int,
            parse_float=_finite_float,
            parse_constant=_refuse_constant,
            object_pairs_hook=_unique_keys,
        )
    except JsonFileError as error:
        raise JsonFileError(f"{what}: {error}") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise JsonFileError(f"{what} is not valid JSON ({shorten(error, 80)})") from None


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
    # lexists, not exists: a link (dangling or not) is an existing entry too, replaced only with force
    if os.path.lexists(target) and not force:
        kind = "is a symbolic link" if target.is_symlink() else "exists"
        raise OutputPathError(f"{shown} {kind}; pass --force to replace it")
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
