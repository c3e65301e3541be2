"""Progress bars where someone watches them, plain lines where stderr is kept.

A tqdm bar redraws itself with carriage returns: on a terminal that is one line that moves, in a log file or a
pipe it is every frame glued into one line. So the commands draw their bars only where stderr is a terminal (and
TQDM_DISABLE is not set, as tqdm's own switch); elsewhere the bar is disabled and the caller logs one plain line
per interval instead (`bar.disable` tells it which).
"""
from __future__ import annotations

import os
import sys


def shown() -> bool:
    """Whether progress bars are drawn: stderr is a terminal and TQDM_DISABLE is unset (or empty)."""
    return sys.stderr.isatty() and not os.environ.get("TQDM_DISABLE")


def progress_bar(total: int, desc: str, *, initial: int = 0, enabled: bool = True, leave: bool = True):
    """A tqdm bar on stderr, drawn only where `shown()` and `enabled` (a rank other than 0 draws none); a
    disabled one otherwise, whose update and set_postfix do nothing."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and shown()), leave=leave,
                dynamic_ncols=True, file=sys.stderr)


def plain_line(desc: str, step: int, total: int, fields: dict, seconds_per_step: float | None = None,
               unit: str = "step") -> str:
    """The plain line that stands for a disabled bar at each interval: the step (or other `unit`), the bar's
    fields in its order, and, given the seconds per step, the rate and the time left at that rate (before the
    last step)."""
    parts = [f"{desc}: {unit} {step}/{total}", *(f"{k} {v}" for k, v in fields.items())]
    if seconds_per_step:
        parts.append(f"{1 / seconds_per_step:.2f} {unit}s/s")
        if step < total:
            left = round((total - step) * seconds_per_step)
            parts.append(f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left")
    return ", ".join(parts)
