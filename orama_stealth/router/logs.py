"""One line per event on stderr, `key=value`, so an operator can grep journald.

Warnings about clients (limits, dial failures, bad hellos) can arrive by the thousand during a
flood; each event kind prints at most one line per second and the next printed line carries
`suppressed=N`, so a flood cannot drown the journal and nothing is silently lost.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._:/[]@+,*")


def _value(v: object) -> str:
    text = str(v)
    if text and all(c in _SAFE for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _timestamp(now: float) -> str:
    whole = int(now)
    ms = int((now - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{ms:03d}Z"


def format_line(level: str, event: str, msg: str, fields: dict[str, object], now: float) -> str:
    parts = [f"ts={_timestamp(now)}", f"level={level}", f"event={event}", f"msg={_value(msg)}"]
    parts.extend(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)
    return " ".join(parts) + "\n"


class Logger:
    """Writes whole lines with one write(2) each, so lines from several workers never interleave."""

    __slots__ = ("_clock", "_fd", "_interval", "_last", "_suppressed", "_tallies", "base")

    def __init__(
        self,
        fd: int = 2,
        interval: float = 1.0,
        clock: Callable[[], float] | None = None,
        **base: object,
    ) -> None:
        self._fd = fd
        self._interval = interval
        self._clock: Callable[[], float] = clock or time.monotonic
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, tuple[str, str, str, int]] = {}
        # kind -> (event, msg, level, occurrences not printed yet, fields of the latest one)
        self._tallies: dict[str, tuple[str, str, str, int, dict[str, object]]] = {}
        self.base: dict[str, object] = dict(base)

    def _write(self, level: str, event: str, msg: str, fields: dict[str, object]) -> None:
        line = format_line(level, event, msg, {**self.base, **fields}, time.time())
        data = line.encode("utf-8", "backslashreplace")
        try:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
        except BlockingIOError:
            pass  # a stuck journal must never stall the data path
        except OSError:
            pass

    def info(self, event: str, msg: str, **fields: object) -> None:
        self._write("info", event, msg, fields)

    def error(self, event: str, msg: str, **fields: object) -> None:
        self._write("error", event, msg, fields)

    def warn(self, event: str, msg: str, **fields: object) -> None:
        """Unlimited: for rare operator-facing warnings (reload rejected, worker died)."""
        self._write("warn", event, msg, fields)

    def limited(
        self, event: str, msg: str, level: str = "warn", kind: str = "", **fields: object
    ) -> bool:
        """At most one line per `interval` per kind (default: the event); True if it printed.

        `kind` splits an event by cause (e.g. hello failures by reason) so one noisy cause
        cannot hide another.
        """
        key = kind or event
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            held = self._suppressed.get(key)
            if held is None:
                self._suppressed[key] = (event, msg, level, 1)
            else:
                self._suppressed[key] = (event, msg, level, held[3] + 1)
            return False
        self._last[key] = now
        held = self._suppressed.pop(key, None)
        if held is not None:
            fields["suppressed"] = held[3]
        self._write(level, event, msg, fields)
        return True

    def tally(
        self, event: str, msg: str, level: str = "warn", kind: str = "", **fields: object
    ) -> bool:
        """For events that come in floods by nature (evictions under attack, accepts failing
        for want of descriptors): at most one line per `interval` per kind, and each line says
        `count=N`, the occurrences since the previous line of that kind (this one included),
        with the fields of the latest. True if it printed."""
        key = kind or event
        now = self._clock()
        held = self._tallies.get(key)
        count = 1 if held is None else held[3] + 1
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._tallies[key] = (event, msg, level, count, fields)
            return False
        self._last[key] = now
        self._tallies.pop(key, None)
        self._write(level, event, msg, {**fields, "count": count})
        return True

    def flush_suppressed(self) -> None:
        """Report counts still held back once their window has passed (called from a tick)."""
        if self._tallies:
            now = self._clock()
            for key in list(self._tallies):
                if now - self._last.get(key, 0.0) >= self._interval:
                    event, msg, level, count, fields = self._tallies.pop(key)
                    self._last[key] = now
                    self._write(level, event, msg, {**fields, "count": count})
        if not self._suppressed:
            return
        now = self._clock()
        for key in list(self._suppressed):
            if now - self._last.get(key, 0.0) >= self._interval:
                event, msg, level, skipped = self._suppressed.pop(key)
                self._last[key] = now
                self._write(level, event, msg, {"kind": key, "suppressed": skipped})
