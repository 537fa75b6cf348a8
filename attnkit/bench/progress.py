"""A progress bar on stderr without dependencies.

On a terminal it redraws one line; into a file or pipe (CI, remote runs) it prints a line
every 10% instead, so logs stay readable.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, enabled: bool = True, stream=None, width: int = 30):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.total = 0
        self.done = 0
        self.t0 = 0.0
        self._next_report = 0.0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def start(self, total: int) -> None:
        self.total, self.done = max(total, 1), 0
        self.t0 = time.perf_counter()
        self._next_report = 0.1

    def _eta(self) -> str:
        elapsed = time.perf_counter() - self.t0
        if self.done == 0:
            return f"{elapsed:5.0f}s"
        left = elapsed / self.done * (self.total - self.done)
        return f"{elapsed:5.0f}s, ~{left:.0f}s left"

    def step(self, label: str) -> None:
        """Announce the cell about to run."""
        if not self.enabled:
            self.done += 1
            return
        frac = self.done / self.total
        if self.tty:
            filled = int(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            line = f"\r[{bar}] {self.done + 1}/{self.total} {self._eta()}  {label}"
            self.stream.write(line[:160].ljust(100))
            self.stream.flush()
        elif frac >= self._next_report or self.done == 0:
            self.stream.write(f"[{frac:4.0%}] {self.done + 1}/{self.total} {self._eta()}  "
                              f"{label}\n")
            self.stream.flush()
            while self._next_report <= frac:
                self._next_report += 0.1
        self.done += 1

    def finish(self) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        end = "\r" + " " * 110 + "\r" if self.tty else ""
        self.stream.write(f"{end}[100%] {self.total} cells in {elapsed:.0f}s\n")
        self.stream.flush()
