"""Writing output files: checked before any work, then written atomically.

An atomic write puts the content in a temporary file beside the target and renames it over the target, so a
reader (or a run killed mid-write) sees the old file or the new one, never half of one. The file gets the mode a
plain `open(path, "w")` would give it (0666 less the umask; the temporary file starts at 0600)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import reason


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_adapter(model, folder: str | Path, tokenizer=None) -> None:
    """The LoRA adapter (peft's save_pretrained, without the base: it never changes) and the tokenizer into
    `folder`, every file with the mode a plain open() gives (safetensors creates its files 0600)."""
    model.save_pretrained(str(folder), save_embedding_layers=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    mode = 0o666 & ~umask()
    for f in Path(folder).rglob("*"):  # peft saves an adapter not named "default" in a folder of that name
        if f.is_file():
            f.chmod(mode)


def existing_folder(path: str | Path) -> Path:
    """The nearest existing ancestor of `path` (where its missing folders would be created); it may be a file, or a
    dangling link (which is no folder either)."""
    folder = Path(path).absolute().parent
    while not folder.exists() and not folder.is_symlink():
        folder = folder.parent
    return folder


def check_spares_inputs(path: str | Path, flag: str, inputs: dict | None) -> None:
    """UsageError where writing `path` (a file, or a directory that --overwrite replaces whole) would write over
    one of `inputs` ({what: a path, or None; names that are not on disk, such as presets, are skipped}): `path`
    is that input, or a folder that holds it."""
    from .cli import UsageError

    out = _resolved(path, flag)
    for what, p in (inputs or {}).items():
        if p is None or not os.path.lexists(p):
            continue
        q = _resolved(p, what)
        if out == q or out in q.parents:
            raise UsageError(f"{flag} {path} {'is' if out == q else 'holds'} {what} ({p}), which this command "
                             f"reads; write elsewhere")


def _resolved(path, flag: str) -> Path:
    """Path(path).resolve(), or a one-line UsageError for a loop of symbolic links (which Python 3.11's resolve
    raises a RuntimeError for, and 3.13's resolves to a path of the loop: asked of os.stat first)."""
    from .cli import UsageError

    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"{flag} {path}: cannot follow its symbolic links (they form a loop)") from None
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as e:
        raise UsageError(f"{flag} {path}: cannot follow its symbolic links ({reason(e, 80)})") from None


def check_not_empty(path, flag: str, what: str) -> None:
    """UsageError for a path given as '': Path("") is the current directory, which no flag means by it. `what`:
    what to give instead."""
    from .cli import UsageError

    if path is not None and not str(path):
        raise UsageError(f"{flag} '' is empty: {what}")


def check_writable_file(path: str | Path, flag: str, inputs: dict | None = None) -> None:
    """Before any work: `path` can be written as a file (not a directory; not one of `inputs`, see
    `check_spares_inputs`; its nearest existing folder is a folder we may create files in: a temporary file is
    made and removed there). Raises UsageError saying why not."""
    from .cli import UsageError

    check_not_empty(path, flag, "give a file name")
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    check_spares_inputs(path, flag, inputs)
    folder = existing_folder(path)
    if not folder.is_dir():
        raise UsageError(f"cannot write {flag} {path}: {folder} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".check")
    except OSError as e:
        raise UsageError(f"cannot write {flag} {path}: {e.strerror or e} in {folder}") from None
    os.close(fd)
    os.unlink(probe)


def fsync_file(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path):
    """Make renames and unlinks inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object], durable: bool = False) -> None:
    """`write(f)` fills a binary temporary file beside `path` (its folder is created), then it replaces `path`.
    `durable`: the content and the rename are fsynced, so that they survive a power cut, not just a kill."""
    path = Path(path)
    folder = path.absolute().parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
        if durable:
            fsync_dir(folder)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str, durable: bool = False) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")), durable)


# torch.save's zip writer reports a failed write (a full disk, a file-size limit) as a RuntimeError from its C++
# side, with one of these in the message; safetensors raises its own SafetensorError ("I/O error: ...")
_TORCH_WRITER = ("PytorchStreamWriter", "inline_container")


def write_failure(e: BaseException) -> str | None:
    """Why a write failed, when `e` is a failed write: an OSError, safetensors' error, torch.save's writer error
    or the tokenizers library's; None for any other exception (a bug, which keeps its traceback)."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if type(e) is Exception and "(os error " in str(e):  # the tokenizers library's (Rust's) I/O errors
        return str(e).strip().split(" (os error ")[0]
    torch_writer = isinstance(e, RuntimeError) and any(w in str(e) for w in _TORCH_WRITER)
    if type(e).__name__ == "SafetensorError" or torch_writer:
        return reason(e)
    return None


@contextlib.contextmanager
def writes(what: str, kept: str = "", where: str | Path | None = None):
    """Inside, a failed write (`write_failure`: a full disk, a folder gone or read-only) becomes the one-line
    OutputError "cannot write WHAT: reason" + `kept` (what a later run can still use): the CLI's exit code 1, no
    traceback. `where`: the folder written to, whose free space is named when torch.save's writer stopped short
    (how it reports a full disk, without the OS's error)."""
    from .cli import OutputError

    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised as it is unless it is a failed write
        why = write_failure(e)
        if why is None:
            raise
        if where is not None and not isinstance(e, OSError) and "unexpected pos" in str(e):
            with contextlib.suppress(OSError):  # (torch.save's writer's words for a short write)
                free = shutil.disk_usage(existing_folder(Path(where) / "x")).free
                why += f" (torch.save stopped short, as on a full disk: {free / 2**20:.1f} MiB free there)"
        raise OutputError(f"cannot write {what}: {why}{kept}") from None


def write_json_atomic(path: str | Path, obj) -> None:
    """`obj` as indented JSON; an OSError is a one-line OutputError (`writes`)."""
    with writes(str(path)):
        write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
