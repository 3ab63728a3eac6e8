"""A small progress bar on stderr: rate-limited redraws on a terminal, a line per ~10% otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

REDRAW_S = 0.2  # at most ~5 redraws a second: drawing must not cost more than the work
NON_TTY_MIN_S = 5.0  # in a log file, short work gets only its final line


def _number(value: float) -> str:
    limit, suffix = next(((lim, s) for lim, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if value >= lim), (1, ""))
    return f"{value / limit:.1f}{suffix}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Count work towards a known total; show percentage, count, rate, ETA and a postfix on stderr."""

    def __init__(
        self, total: int, desc: str = "", unit: str = "it", enabled: bool = True, stream: TextIO | None = None
    ):
        self.total, self.desc, self.unit, self.enabled = max(int(total), 0), desc, unit, enabled
        self.stream = stream or sys.stderr
        self.postfix, self.count = "", 0
        self.start = self._last_draw = time.monotonic()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_tenth, self._width, self._closed = 0, 0, False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Add `n` units of finished work; redraw if it is time to."""
        self.count += n
        if not self.enabled or self._closed:
            return
        now = time.monotonic()
        if self._tty:
            if now - self._last_draw >= REDRAW_S:
                self._draw(now)
        elif self.total and self.count < self.total:
            # Logs and pipes get a line per tenth, not a torrent of carriage returns.
            tenth = 10 * self.count // self.total
            if tenth > self._last_tenth and now - self._last_draw >= NON_TTY_MIN_S:
                self._last_tenth = tenth
                self._draw(now)

    def close(self) -> None:
        """Draw the final state once and end the line."""
        if self.enabled and not self._closed:
            self._draw(time.monotonic(), final=True)
        self._closed = True

    def _draw(self, now: float, final: bool = False) -> None:
        elapsed = now - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        percent = 100.0 * self.count / self.total if self.total else 100.0
        eta = f"eta {_clock((self.total - self.count) / rate)}" if rate > 0 else "eta ?"
        timing = f"in {_clock(elapsed)}" if final else eta
        parts = [self.desc, f"{percent:5.1f}%", f"{self.count:,}/{self.total:,}"]
        parts += [f"{_number(rate)} {self.unit}/s", timing, self.postfix]
        line = "  ".join(part for part in parts if part)
        # On a terminal: redraw in place, padding over a longer previous line; the newline only at the end.
        end = "\n" if final or not self._tty else ""
        self.stream.write(("\r" + line.ljust(self._width) if self._tty else line) + end)
        self.stream.flush()
        self._width, self._last_draw = len(line), now
