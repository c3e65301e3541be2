"""Local data files: a .json array or .jsonl lines of row objects, read once and checked field by field, every
error one line (`DataError`). Two kinds of row: prompt/refusal/response pairs (RepNoise's BeaverTails refusals:
the alignment rows answer with the refusal, the harmful rows with the response) and Alpaca's
instruction/input/output rows. data.py's loaders take either from here."""
from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Bad data or data arguments; the message is one line, fit to print before exiting with status 2."""


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    output: str


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _parse_jsonl(path, text: str) -> list[tuple[str, object]]:
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path} line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{path} line {lineno}: JSON nested too deeply") from None
        except ValueError as e:  # (after JSONDecodeError, its subclass) an integer beyond Python's digit limit
            raise DataError(f"{path} line {lineno}: {_too_long(e)}") from None
    return rows


def _too_long(e: ValueError) -> str:
    """The one-line error for JSON that parses but holds an integer longer than Python converts."""
    return f"a number too long to read ({str(e).split(':')[0]})"


def _special_kind(p: Path) -> str:
    """What a path that exists but is neither a directory nor a regular file is, in words."""
    mode = p.stat().st_mode
    for test, kind in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "a special file"


def read_rows(path: str, expected: str = "'builtin', a known data set name, or a .json/.jsonl path"
               ) -> list[tuple[str, object]]:
    """[(location for messages, parsed row)] from a .json array or .jsonl file; DataError on anything malformed
    (`expected`: what the argument may be, for the error of a missing file)."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{path}: a directory, not a .json/.jsonl file")
    if p.exists() and not p.is_file():
        raise DataError(f"{path}: {_special_kind(p)}, not a regular .json/.jsonl file")
    if not p.is_file():
        raise DataError(f"{path}: no such file (expected {expected})")
    suffix = p.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; expected .json or .jsonl")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: empty data set (the file holds no text)")
    if suffix == ".jsonl":
        rows = _parse_jsonl(path, text)
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":      # JSON Lines saved as .json
                return _nonempty(path, _parse_jsonl(path, text))
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply") from None
        except ValueError as e:
            raise DataError(f"{path}: {_too_long(e)}") from None
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a JSON array of row objects, got a JSON {_json_type(obj)}")
        rows = [(f"{path} row {i}", row) for i, row in enumerate(obj, 1)]
    return _nonempty(path, rows)


def _nonempty(path, rows):
    if not rows:
        raise DataError(f"{path}: empty data set (no rows)")
    return rows


def _fields(loc: str, row, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, str]:
    if not isinstance(row, dict):
        raise DataError(f"{loc}: expected a JSON object, got a JSON {_json_type(row)}")
    out = {}
    for name in required + optional:
        if name not in row or (name in optional and row[name] is None):
            if name in required:
                raise DataError(f"{loc}: missing field {name!r}")
            out[name] = ""
            continue
        if not isinstance(row[name], str):
            raise DataError(f"{loc}: field {name!r} must be a string, got a JSON {_json_type(row[name])}")
        try:  # JSON's \ud800 escapes parse to lone surrogates, which no tokenizer takes
            row[name].encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{loc}: field {name!r} is not valid UTF-8 text (a lone surrogate)") from None
        out[name] = row[name]
    return out


PAIR_FIELDS = ("prompt", "refusal", "response")
INSTRUCTION_FIELDS = ("instruction", "output")


def row_format(loc: str, row) -> str:
    """"pairs" or "instruction": the kind of a file's row (its first decides for the file); DataError otherwise."""
    if isinstance(row, dict):
        if any(k in row for k in PAIR_FIELDS):
            return "pairs"
        if any(k in row for k in ("instruction", "output")):
            return "instruction"
        keys = ", ".join(map(str, list(row)[:8])) or "none"
        raise DataError(f"{loc}: unrecognised row: expected fields prompt/refusal/response or "
                        f"instruction/input/output, got {keys}")
    raise DataError(f"{loc}: expected a JSON object, got a JSON {_json_type(row)}")


def clean_refusal(refusal: str) -> str:
    """RepNoise refusals read "Question: <prompt>\\nAnswer: <refusal>"; keep the answer."""
    if refusal.startswith("Question:") and "\nAnswer:" in refusal:
        return refusal.split("\nAnswer:", 1)[1].lstrip(" ")
    return refusal


def pairs(rows) -> tuple[list[Example], list[Example]]:
    """(alignment rows: prompt -> refusal, harmful rows: prompt -> response) of prompt/refusal/response rows."""
    align, harmful = [], []
    for loc, row in rows:
        f = _fields(loc, row, PAIR_FIELDS)
        align.append(Example(f["prompt"], "", clean_refusal(f["refusal"])))
        harmful.append(Example(f["prompt"], "", f["response"]))
    return align, harmful


def instructions(rows) -> list[Example]:
    """Examples of instruction/input/output rows (input optional)."""
    out = []
    for loc, row in rows:
        f = _fields(loc, row, INSTRUCTION_FIELDS, ("input",))
        out.append(Example(f["instruction"], f["input"], f["output"]))
    return out


def load_harmful_file(path: str) -> list[Example]:
    """The harmful rows of a file of either kind, used whole (read once): the prompt -> response pairs of
    prompt/refusal/response rows, or instruction/input/output rows as they are; DataError for a malformed file."""
    rows = read_rows(path)
    return pairs(rows)[1] if row_format(*rows[0]) == "pairs" else instructions(rows)


def instruction_file(path: str) -> list[Example]:
    """A file of instruction/input/output rows; DataError for the other kind or a malformed file."""
    rows = read_rows(path, "a .json/.jsonl file of instruction/input/output rows")
    if row_format(*rows[0]) != "instruction":
        raise DataError(f"{path}: expected instruction/input/output rows, got prompt/refusal/response rows")
    return instructions(rows)
