"""A progress bar on stderr: redrawn in place on a terminal, one line per phase otherwise
(a log file or CI gets what happened, not hundreds of carriage returns)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO, TypeVar

T = TypeVar("T")
WIDTH = 30


class Progress:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self._drawn = False

    def phase(self, text: str) -> None:
        """A phase begins (a line of its own when not on a terminal)."""
        if not self.enabled:
            return
        if self.tty:
            self.update(0.0, text)
        else:
            print(text, file=self.stream, flush=True)

    def update(self, fraction: float, text: str) -> None:
        if not self.tty:
            return
        fraction = min(max(fraction, 0.0), 1.0)
        filled = int(fraction * WIDTH)
        bar = "#" * filled + "." * (WIDTH - filled)
        self.stream.write(f"\r\x1b[K[{bar}] {fraction * 100:3.0f}% {text}")
        self.stream.flush()
        self._drawn = True

    def done(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def timed(self, text: str, seconds: float, work: Callable[[], T]) -> T:
        """Run ``work`` (expected to take ``seconds``) in a thread, the bar showing the
        time gone; its result, or its exception, re-raised here."""
        self.phase(text)
        if not self.tty:
            return work()
        outcome: list = []

        def run() -> None:
            try:
                outcome.append((True, work()))
            except BaseException as exc:  # handed to the caller
                outcome.append((False, exc))

        thread = threading.Thread(target=run, name="capacity-load", daemon=True)
        started = time.monotonic()
        thread.start()
        while thread.is_alive():
            self.update((time.monotonic() - started) / seconds, text)
            thread.join(0.2)
        self.done()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value
