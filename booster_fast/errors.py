"""An exception told in one line, for the one-line errors and for the log lines that name a failure.

Tracebacks stay out of the output: the first line of a message says what went wrong, joined by the next one
where the first is only a header ending in a colon ("Error(s) in loading state_dict for X:").
"""
from __future__ import annotations


def reason(e: BaseException, limit: int = 300) -> str:
    """An exception's message in one line: its first line, joined by the next where the first ends in a colon (a
    header such as "Validation error for field 'x':" or "Error(s) in loading state_dict for ...:", whose next
    line says what is wrong); the type's name for an empty message. At most `limit` characters."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text[:limit]


def described(e: BaseException, limit: int = 300) -> str:
    """`TypeName: reason` (reason above), or the type's name alone for an empty message."""
    return f"{type(e).__name__}: {reason(e, limit)}" if str(e).strip() else type(e).__name__
