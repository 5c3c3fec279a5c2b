"""Backend addresses: IP literals at once, names through the loop's getaddrinfo, cached.

A backend is nearly always an IP literal (loopback), answered without a lookup. A name is
resolved once per TTL for every connection that needs it: connections that arrive while the
lookup runs wait on the same answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from orama_stealth.router.config import Backend

ANSWER_TTL = 30.0
FAILURE_TTL = 1.0

Target = tuple[int, tuple[str, int]]  # (family, sockaddr)


class Resolver:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._answers: dict[str, tuple[float, Target | str]] = {}
        self._waiting: dict[str, list[Callable[[], None]]] = {}

    def resolve(self, backend: Backend, then: Callable[[], None]) -> Target | str | None:
        """(family, sockaddr), an error text, or None while resolving: `then()` runs once the
        answer is in, and calling resolve() again returns it."""
        key = backend.addr
        hit = self._answers.get(key)
        if hit is not None and hit[0] > self.loop.time():
            return hit[1]
        host = backend.host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            target: Target = (fam, (host, backend.port))
            self._answers[key] = (float("inf"), target)
            return target
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(then)
            return None
        self._waiting[key] = [then]
        task = self.loop.create_task(
            self.loop.getaddrinfo(host, backend.port, type=socket.SOCK_STREAM)
        )
        task.add_done_callback(lambda t: self._answered(key, host, backend.port, t))
        return None

    def _answered(self, key: str, host: str, port: int, task: asyncio.Task[list[Any]]) -> None:
        answer: Target | str
        err = None if task.cancelled() else task.exception()
        infos = task.result() if err is None and not task.cancelled() else []
        if infos:
            info = infos[0]
            answer = (int(info[0]), (str(info[4][0]), port))
            ttl = ANSWER_TTL
        else:
            answer = f"cannot resolve {host}: {err or 'no address'}"
            ttl = FAILURE_TTL
        self._answers[key] = (self.loop.time() + ttl, answer)
        for cb in self._waiting.pop(key, []):
            cb()
