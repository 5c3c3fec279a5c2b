"""Run a coroutine on each event loop the router supports (the tests take `loop_name`)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from orama_stealth.router.loop import choose

LOOPS = ("asyncio", "uvloop")
T = TypeVar("T")


def run_on(loop_name: str, coro: Coroutine[Any, Any, T]) -> T:
    name, factory = choose(loop_name)
    assert name == loop_name
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coro, 20))
