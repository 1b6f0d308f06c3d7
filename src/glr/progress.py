"""Progress bars that suit both a terminal and a log file (dvc repro, CI)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """tqdm with ETA; redrawn often on a terminal, every 30 s when the output is a log."""
    kwargs.setdefault("mininterval", 0.5 if sys.stderr.isatty() else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
