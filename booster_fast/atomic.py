"""Atomic file writes: the content goes to a temporary file beside the target, which is then renamed over it, so
a reader (or a run killed mid-write) sees the old file or the new one, never half of one. The file gets the mode
a plain `open(path, "w")` would give it (0666 less the umask; the temporary file starts at 0600)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(f)` fills a binary temporary file beside `path` (its folder is created), then it replaces `path`."""
    path = Path(path)
    folder = path.absolute().parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str | Path, obj) -> None:
    """`obj` as indented JSON. An OSError (a full disk, a folder gone or read-only) becomes a one-line
    UsageError: the CLI's exit code 2, no traceback."""
    from .cli import UsageError

    try:
        write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
