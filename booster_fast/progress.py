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
