"""The progress line of a cohort run: a bar, done/failed/skipped counts and an ETA from the cases finished so
far (redrawn in place on a terminal, one line per case otherwise, so logs stay readable)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR = 20


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(
        self, total: int, skipped: int = 0, stream: TextIO | None = None, quiet: bool = False
    ) -> None:
        self.total, self.skipped = total, skipped
        self.done = self.failed = 0
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.started = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self) -> str:
        finished = self.done + self.failed
        to_run = self.total - self.skipped
        filled = BAR * (finished + self.skipped) // max(self.total, 1)
        eta = "?"
        if finished:
            eta = _clock((time.monotonic() - self.started) / finished * (to_run - finished))
        bar = "#" * filled + "-" * (BAR - filled)
        return (
            f"[{bar}] {finished + self.skipped}/{self.total}: {self.done} done, {self.failed} failed, "
            f"{self.skipped} skipped; ETA {eta}"
        )

    def update(self, status: str, case: str = "", reason: str = "") -> None:
        if status == "done":
            self.done += 1
        elif status == "failed":
            self.failed += 1
        if self.quiet:
            return
        if status == "failed" and reason:
            self._clear()
            print(f"case {case} failed: {reason}", file=self.stream)
        self._show()

    def _clear(self) -> None:
        if self.tty:
            print("\r\033[K", end="", file=self.stream)

    def _show(self) -> None:
        if self.tty:
            print(f"\r{self.line()}", end="", file=self.stream, flush=True)
        else:
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty and not self.quiet:
            print(file=self.stream)
