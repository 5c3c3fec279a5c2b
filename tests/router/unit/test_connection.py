"""A connection's phases, in-process: a worker without a process or listeners, real TCP
sockets on loopback, each accepted client descriptor handed to `Worker.admit`."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

from support.loops import run_on
from support.procs import free_port
from support.tls_backends import client_hello

from orama_stealth.router.admission import LocalAdmission
from orama_stealth.router.config import parse_config
from orama_stealth.router.connection import Conn, Phase, Stage
from orama_stealth.router.logs import Logger
from orama_stealth.router.metrics import StatsRegion
from orama_stealth.router.worker import Worker

LOOPBACK = "127.0.0.1"


class Rig:
    """A worker, a backend listener, and a way to make client connections it admits."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tmp: Path, backend_port: int,
                 **options: str) -> None:
        self.loop = loop
        lines = [f'listen: "{LOOPBACK}:1"', f'fallback: {{name: fb, addr: "{LOOPBACK}:1"}}',
                 "routes:",
                 f'  - {{match: "app.example.test", backend: {{name: app,'
                 f' addr: "{LOOPBACK}:{backend_port}"}}}}']
        lines += [f"{k}: {v}" for k, v in options.items()]
        self.cfg = parse_config("\n".join(lines) + "\n", "test.yaml")
        self.logfile = tmp / "worker.log"
        self._logfd = open(self.logfile, "ab")  # noqa: SIM115 - closed in close()
        self.worker = Worker(
            0, self.cfg, [], LocalAdmission(100, 0), StatsRegion(1), None,
            Logger(fd=self._logfd.fileno(), worker=0),
        )
        self.front = socket.socket()
        self.front.bind((LOOPBACK, 0))
        self.front.listen(16)

    async def start(self) -> None:
        await self.worker.start(self.loop)

    async def client(self) -> tuple[socket.socket, Conn]:
        """A TCP client whose accepted descriptor the worker admits; returns its Conn."""
        c = socket.socket()
        c.setblocking(False)
        await self.loop.sock_connect(c, self.front.getsockname())
        s, addr = self.front.accept()
        registry = self.worker.ctx.registry
        before = set(registry)
        self.worker.admit(s.detach(), socket.AF_INET, addr, self.cfg.listeners[0])
        new = set(registry) - before
        conn = new.pop() if new else None
        assert conn is not None or self.worker.stats.active == 0
        return c, conn  # type: ignore[return-value]

    def log(self) -> str:
        return self.logfile.read_text()

    async def until(self, cond: object, timeout: float = 5.0) -> None:
        deadline = self.loop.time() + timeout
        while not cond():  # type: ignore[operator]
            assert self.loop.time() < deadline, f"condition not reached\n{self.log()}"
            await asyncio.sleep(0.005)

    def close(self) -> None:
        self.worker.close()
        self.front.close()
        self._logfd.close()


@contextlib.asynccontextmanager
async def rig(tmp: Path, backend_port: int, **options: str) -> AsyncIterator[Rig]:
    r = Rig(asyncio.get_running_loop(), tmp, backend_port, **options)
    await r.start()
    try:
        yield r
    finally:
        r.close()


async def recv_exact(loop: asyncio.AbstractEventLoop, s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = await loop.sock_recv(s, n - len(buf))
        if not data:
            break
        buf += data
    return buf


def backend_listener(port: int = 0) -> socket.socket:
    b = socket.socket()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    b.bind((LOOPBACK, port))
    b.listen(16)
    b.setblocking(False)
    return b


def test_whole_hello_at_accept_goes_straight_to_relay(loop_name: str, tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        backend = backend_listener()
        hello = client_hello("app.example.test")
        async with rig(tmp_path, backend.getsockname()[1]) as r:
            c = socket.socket()
            c.setblocking(False)
            await loop.sock_connect(c, r.front.getsockname())
            await loop.sock_sendall(c, hello)
            await asyncio.sleep(0.05)  # the hello is queued before accept (TCP_DEFER_ACCEPT)
            s, addr = r.front.accept()
            r.worker.admit(s.detach(), socket.AF_INET, addr, r.cfg.listeners[0])
            registry = r.worker.ctx.registry
            assert registry.count(Stage.RELAY) == 1 and len(registry) == 1
            conn = next(registry.stage(Stage.RELAY))
            assert conn.phase is Phase.RELAY and conn.timer is None
            b, _ = await loop.sock_accept(backend)
            assert await recv_exact(loop, b, len(hello)) == hello
            await loop.sock_sendall(b, b"server flight")
            assert await recv_exact(loop, c, 13) == b"server flight"
            c.close()
            b.close()
            await r.until(lambda: conn.phase is Phase.CLOSED)
            assert len(registry) == 0 and r.worker.stats.active == 0
            assert r.worker.stats.conns["app"] == 1
        backend.close()

    run_on(loop_name, main())


def test_hello_in_pieces_waits_in_hello_wait_then_relays(loop_name: str, tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        backend = backend_listener()
        hello = client_hello("app.example.test")
        async with rig(tmp_path, backend.getsockname()[1]) as r:
            c, conn = await r.client()
            assert conn.phase is Phase.HELLO_WAIT and conn.timer is not None
            registry = r.worker.ctx.registry
            assert registry.count(Stage.HELLO) == 1
            for i in range(0, len(hello), 100):
                await loop.sock_sendall(c, hello[i : i + 100])
                await asyncio.sleep(0.01)
            await r.until(lambda: conn.phase is Phase.RELAY)
            assert conn.timer is None and registry.count(Stage.HELLO) == 0
            b, _ = await loop.sock_accept(backend)
            assert await recv_exact(loop, b, len(hello)) == hello
            c.close()
            b.close()
            await r.until(lambda: conn.phase is Phase.CLOSED)
        backend.close()

    run_on(loop_name, main())


def test_incomplete_hello_is_closed_at_the_hello_timeout(loop_name: str, tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with rig(tmp_path, free_port(), client_hello_timeout="200ms") as r:
            c, conn = await r.client()
            await loop.sock_sendall(c, client_hello("app.example.test")[:50])
            await r.until(lambda: conn.phase is Phase.CLOSED, timeout=3)
            assert r.worker.stats.hello_failures["timeout"] == 1
            assert await loop.sock_recv(c, 10) == b""
            assert "reason=timeout" in r.log()
            c.close()

    run_on(loop_name, main())


def test_plain_bytes_are_dropped_as_not_tls(loop_name: str, tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with rig(tmp_path, free_port()) as r:
            c, conn = await r.client()
            await loop.sock_sendall(c, b"GET / HTTP/1.1\r\n\r\n")
            await r.until(lambda: conn.phase is Phase.CLOSED)
            assert r.worker.stats.hello_failures["not_tls"] == 1
            c.close()

    run_on(loop_name, main())


def test_refused_dial_is_retried_until_the_backend_listens(loop_name: str, tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        port = free_port()
        hello = client_hello("app.example.test")
        async with rig(tmp_path, port, backend_dial_timeout="5s") as r:
            c, conn = await r.client()
            await loop.sock_sendall(c, hello)
            await r.until(lambda: conn.phase is Phase.DIAL_RETRY)
            assert r.worker.ctx.registry.count(Stage.DIAL) == 1
            await asyncio.sleep(0.1)
            backend = backend_listener(port)
            b, _ = await loop.sock_accept(backend)
            assert await recv_exact(loop, b, len(hello)) == hello
            await r.until(lambda: conn.phase is Phase.RELAY)
            assert r.worker.stats.dial_failures["app"] == 0
            c.close()
            b.close()
            backend.close()
            await r.until(lambda: conn.phase is Phase.CLOSED)

    run_on(loop_name, main())


def test_dial_gives_up_at_the_dial_timeout(loop_name: str, tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with rig(tmp_path, free_port(), backend_dial_timeout="300ms") as r:
            c, conn = await r.client()
            started = loop.time()
            await loop.sock_sendall(c, client_hello("app.example.test"))
            await r.until(lambda: conn.phase is Phase.CLOSED, timeout=3)
            assert loop.time() - started >= 0.25  # retried meanwhile, not given up at once
            assert r.worker.stats.dial_failures["app"] == 1
            line = next(ln for ln in r.log().splitlines() if "event=dial_failed" in ln)
            # The deadline timer says "timeout after"; a retry that a busy loop runs past the
            # deadline gives up with the refusal itself. Both name the cause.
            assert "Connection refused" in line
            assert len(r.worker.ctx.registry) == 0
            c.close()

    run_on(loop_name, main())


def test_a_name_backend_is_resolved_through_the_loop(loop_name: str, tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        backend = backend_listener()
        hello = client_hello("app.example.test")
        port = backend.getsockname()[1]
        async with rig(tmp_path, port) as r:
            # The route table is swapped as a reload would: a name instead of an address.
            text = (f'listen: "{LOOPBACK}:1"\nfallback: {{name: fb, addr: "localhost:{port}"}}\n')
            r.worker.apply(parse_config(text, "reload.yaml").with_runtime_of(r.cfg))
            c, conn = await r.client()
            await loop.sock_sendall(c, hello)
            b, _ = await loop.sock_accept(backend)
            assert await recv_exact(loop, b, len(hello)) == hello
            await r.until(lambda: conn.phase is Phase.RELAY)
            c.close()
            b.close()
            await r.until(lambda: conn.phase is Phase.CLOSED)
        backend.close()

    run_on(loop_name, main())


def test_a_client_that_resets_while_its_backend_is_dialed_is_closed_at_once(
    loop_name: str, tmp_path: Path
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with rig(tmp_path, free_port(), backend_dial_timeout="10s") as r:
            c, conn = await r.client()
            await loop.sock_sendall(c, client_hello("app.example.test"))
            # Nothing listens: the dial is retried until the 10 s deadline.
            await r.until(lambda: conn.phase is Phase.DIAL_RETRY)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            started = loop.time()
            await r.until(lambda: conn.phase is Phase.CLOSED, timeout=1)
            assert loop.time() - started < 0.5
            assert len(r.worker.ctx.registry) == 0 and r.worker.stats.active == 0
            assert r.worker.relay is not None and r.worker.relay.watched == {}

    run_on(loop_name, main())
