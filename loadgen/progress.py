"""A one-line progress bar on stderr, redrawn a few times a second (never per request, to stay cheap)."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Counts finished requests; ``run()`` redraws the bar until cancelled, ``close()`` ends the line."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30, interval: float = 0.25) -> None:
        self.total = max(total, 0)
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.interval = interval
        self.done = 0
        self.failed = 0
        self._began = time.perf_counter()

    def finished(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok

    def line(self) -> str:
        elapsed = time.perf_counter() - self._began
        fraction = self.done / self.total if self.total else 1.0
        filled = round(self.width * min(fraction, 1.0))
        bar = "#" * filled + "." * (self.width - filled)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return (
            f"[{bar}] {self.done}/{self.total} {100 * fraction:3.0f}% "
            f"{rate:.1f} req/s, {self.failed} failed, {elapsed:.0f}s"
        )

    def draw(self) -> None:
        self.stream.write("\r" + self.line())
        self.stream.flush()

    async def run(self) -> None:
        while True:
            self.draw()
            await asyncio.sleep(self.interval)

    def close(self) -> None:
        self.draw()
        self.stream.write("\n")
        self.stream.flush()
