"""Which asyncio event loop a worker runs: uvloop when installed, the standard library's
otherwise. `ORAMA_LOOP=asyncio|uvloop` forces one (the tests run the router with each)."""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Callable

ENV = "ORAMA_LOOP"
CHOICES = ("auto", "asyncio", "uvloop")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class LoopError(Exception):
    pass


def choose(setting: str | None = None) -> tuple[str, LoopFactory]:
    """(name, factory) for `setting` (default: $ORAMA_LOOP, else auto)."""
    want = (setting if setting is not None else os.environ.get(ENV, "")).strip() or "auto"
    if want not in CHOICES:
        raise LoopError(f"{ENV}={want!r}: expected one of {', '.join(CHOICES)}")
    if want in ("auto", "uvloop"):
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            if want == "uvloop":
                raise LoopError(f"{ENV}=uvloop but uvloop is not installed") from None
        else:
            factory: LoopFactory = uvloop.new_event_loop
            return "uvloop", factory
    return "asyncio", asyncio.new_event_loop
