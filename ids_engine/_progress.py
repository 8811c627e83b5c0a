"""Progress reporting without UI imports: long functions take ``progress=`` callables."""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional

__all__ = ["Progress", "ProgressCallback", "TextProgressBar", "null_progress"]

# progress(done, total, label) -> None
ProgressCallback = Callable[[int, int, str], None]
Progress = Optional[ProgressCallback]


def null_progress(done: int, total: int, label: str = "") -> None:  # noqa: ARG001
    """A progress callback that does nothing."""


class TextProgressBar:
    """A terminal progress bar for the CLI: ``bar(done, total, label)``.

    Draws on stderr, only when stderr is a terminal or ``force`` is set; prints a final
    line with the elapsed time when ``done == total``.
    """

    def __init__(self, width: int = 30, stream=None, force: bool = False) -> None:
        self.width = width
        self.stream = stream or sys.stderr
        self.enabled = force or getattr(self.stream, "isatty", lambda: False)()
        self._t0 = time.perf_counter()

    def __call__(self, done: int, total: int, label: str = "") -> None:
        if not self.enabled or total <= 0:
            return
        frac = min(max(done / total, 0.0), 1.0)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        end = "\n" if done >= total else ""
        elapsed = time.perf_counter() - self._t0
        self.stream.write(f"\r{label:<28.28} [{bar}] {done}/{total} {elapsed:6.1f}s{end}")
        self.stream.flush()
