"""The relay on its own, in-process, over socket pairs: bytes both ways, back-pressure,
half-close in either order, a peer's reset, and the switch to splice for bulk."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest
from support.loops import run_on

from orama_stealth.router.metrics import Stats
from orama_stealth.router.relay import BULK_READS, RD, WATCH, WR, Half, Relay


class Recorder:
    """The relay's owner: records what the Halves report, closes like a connection does."""

    def __init__(self) -> None:
        self.closed = 0
        self.halves_done = 0
        self.pair: tuple[Half, Half] | None = None
        self.fds: list[int] = []

    def half_done(self) -> None:
        self.halves_done += 1
        assert self.pair is not None
        if all(h.done for h in self.pair):
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed += 1
        assert self.pair is not None
        for h in self.pair:
            h.release()
        for fd in self.fds:
            os.close(fd)


class Rig:
    """client_app <-> [cfd relay bfd] <-> backend_app, all AF_UNIX stream pairs."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.stats = Stats()
        self.errors: list[BaseException] = []
        self.relay = Relay(self.stats, lambda e, _w: self.errors.append(e))
        loop.add_reader(self.relay.fileno(), self.relay.on_ready)
        self.client, c_router = socket.socketpair()
        b_router, self.backend = socket.socketpair()
        for s in (self.client, self.backend):
            s.setblocking(False)
        self.owner = Recorder()
        cfd, bfd = c_router.detach(), b_router.detach()
        os.set_blocking(cfd, False)
        os.set_blocking(bfd, False)
        self.owner.fds = [cfd, bfd]
        self.up, self.down = self.relay.pair(self.owner, cfd, bfd)
        self.owner.pair = (self.up, self.down)

    def start(self, first: bytes = b"") -> None:
        self.up.start(first)
        self.down.start()

    async def recv_exact(self, sock: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            data = await self.loop.sock_recv(sock, min(1 << 16, n - len(buf)))
            if not data:
                break
            buf += data
        return bytes(buf)

    async def until(self, cond: object, timeout: float = 5.0) -> None:
        deadline = self.loop.time() + timeout
        while not cond():  # type: ignore[operator]
            assert self.loop.time() < deadline, "condition not reached"
            await asyncio.sleep(0.005)

    def close(self) -> None:
        self.owner.close()
        self.loop.remove_reader(self.relay.fileno())
        self.relay.close()
        self.client.close()
        self.backend.close()


def test_bytes_both_ways_and_the_first_bytes_go_first(loop_name: str) -> None:
    async def main() -> None:
        rig = Rig(asyncio.get_running_loop())
        try:
            rig.start(b"HEAD")
            await rig.loop.sock_sendall(rig.client, b"hello backend")
            assert await rig.recv_exact(rig.backend, 17) == b"HEADhello backend"
            await rig.loop.sock_sendall(rig.backend, b"hello client")
            assert await rig.recv_exact(rig.client, 12) == b"hello client"
            assert rig.up.fold() == 13 and rig.down.fold() == 12
            assert rig.stats.bytes_up == 13 and rig.stats.bytes_down == 12
            assert rig.up.fold() == 0  # folded once
        finally:
            rig.close()
        assert not rig.errors

    run_on(loop_name, main())


@pytest.mark.parametrize("first", ["client", "backend"])
def test_half_close_passes_the_fin_on_and_the_other_way_keeps_flowing(
    loop_name: str, first: str
) -> None:
    async def main() -> None:
        rig = Rig(asyncio.get_running_loop())
        try:
            rig.start()
            a, b = (rig.client, rig.backend) if first == "client" else (rig.backend, rig.client)
            await rig.loop.sock_sendall(a, b"last words")
            a.shutdown(socket.SHUT_WR)
            assert await rig.recv_exact(b, 64) == b"last words"  # then EOF: shorter than asked
            assert rig.owner.halves_done == 1 and not rig.owner.closed
            await rig.loop.sock_sendall(b, b"still talking" * 1000)
            assert await rig.recv_exact(a, 13000) == b"still talking" * 1000
            b.shutdown(socket.SHUT_WR)
            await rig.until(lambda: rig.owner.closed)
            assert rig.owner.halves_done == 2
            assert await rig.loop.sock_recv(a, 10) == b""
        finally:
            rig.close()
        assert not rig.errors

    run_on(loop_name, main())


def test_a_slow_reader_stops_the_source_until_it_drains(loop_name: str) -> None:
    async def main() -> None:
        rig = Rig(asyncio.get_running_loop())
        try:
            rig.start()
            data = os.urandom(4 << 20)
            sender = asyncio.ensure_future(rig.loop.sock_sendall(rig.client, data))
            # Nobody reads the backend side: the relay must stop reading the client and wait.
            await rig.until(lambda: bool(rig.up.pending) or rig.up.inpipe)
            assert not rig.up.mask & RD
            assert rig.down.mask & WR  # the backend socket is watched for the flush
            got = await rig.recv_exact(rig.backend, len(data))
            await sender
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            await rig.until(lambda: bool(rig.up.mask & RD))
            assert not rig.up.pending
        finally:
            rig.close()
        assert not rig.errors

    run_on(loop_name, main())


def test_bulk_switches_to_splice_and_arrives_intact(loop_name: str) -> None:
    async def main() -> None:
        rig = Rig(asyncio.get_running_loop())
        try:
            rig.start()
            data = os.urandom(16 << 20)

            async def read_all() -> bytes:
                return await rig.recv_exact(rig.client, len(data))

            reader = asyncio.ensure_future(read_all())
            await rig.loop.sock_sendall(rig.backend, data)
            rig.backend.shutdown(socket.SHUT_WR)
            got = await reader
            assert len(got) == len(data)
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            assert rig.stats.splice_switches + rig.stats.splice_refused == 1
            assert rig.down.full >= BULK_READS or rig.down.pipe_r >= 0
            await rig.until(lambda: rig.down.done)
        finally:
            rig.close()
        assert not rig.errors

    run_on(loop_name, main())


def test_a_reset_peer_closes_the_connection(loop_name: str) -> None:
    async def main() -> None:
        rig = Rig(asyncio.get_running_loop())
        try:
            rig.start()
            await rig.loop.sock_sendall(rig.client, b"x")
            assert await rig.recv_exact(rig.backend, 1) == b"x"
            # A unix socket closed with unread data resets its peer, as a TCP RST does.
            await rig.loop.sock_sendall(rig.client, b"unread")
            await asyncio.sleep(0.05)
            rig.backend.close()
            await rig.until(lambda: rig.owner.closed)
            assert rig.relay.halves == {}
        finally:
            rig.close()

    run_on(loop_name, main())


def test_a_reset_while_reading_is_paused_is_noticed_at_once(loop_name: str) -> None:
    async def main() -> None:
        rig = Rig(asyncio.get_running_loop())
        try:
            rig.start()
            # Something the client never reads, so its close below is a reset.
            await rig.loop.sock_sendall(rig.backend, b"unread by the client")
            await rig.until(lambda: rig.stats is not None and not rig.down.pending)
            sender = asyncio.ensure_future(rig.loop.sock_sendall(rig.client, bytes(4 << 20)))
            # Nobody reads the backend side: reading the client stops, and nothing else is
            # wanted on the client's socket (the other direction has nothing to flush).
            await rig.until(lambda: bool(rig.up.pending) or rig.up.inpipe)
            assert not rig.up.mask & (RD | WR)
            assert rig.up.mask == WATCH, "a paused source must stay in the epoll set"
            sender.cancel()
            await asyncio.sleep(0)
            rig.client.close()
            await rig.until(lambda: rig.owner.closed, timeout=1.0)
            assert rig.relay.halves == {}
        finally:
            rig.close()
        assert not rig.errors

    run_on(loop_name, main())


def test_a_hang_up_behind_a_paused_read_loses_nothing_and_does_not_spin(loop_name: str) -> None:
    async def main() -> None:
        rig = Rig(asyncio.get_running_loop())
        wakeups = 0
        real = rig.relay.on_ready

        def counting() -> None:
            nonlocal wakeups
            wakeups += 1
            real()

        rig.loop.remove_reader(rig.relay.fileno())
        rig.loop.add_reader(rig.relay.fileno(), counting)
        try:
            rig.start()
            # The backend finishes its direction first: the router shuts the client's write.
            rig.backend.shutdown(socket.SHUT_WR)
            assert await rig.recv_exact(rig.client, 1) == b""
            await rig.until(lambda: rig.down.done)
            # The client sends all that fits while nobody reads the backend side.
            sent = bytearray()
            chunk = os.urandom(1 << 16)
            for _ in range(200):
                try:
                    n = rig.client.send(chunk)
                except BlockingIOError:
                    await asyncio.sleep(0.02)
                    if rig.up.pending or rig.up.inpipe:
                        try:
                            n = rig.client.send(chunk)
                        except BlockingIOError:
                            break
                    else:
                        continue
                sent += chunk[:n]
            assert rig.up.pending or rig.up.inpipe
            # Then it finishes too: both directions of the router's client socket are shut
            # (EPOLLHUP, level-triggered) while its last bytes wait behind the paused read.
            rig.client.shutdown(socket.SHUT_WR)
            await asyncio.sleep(0.2)
            assert not rig.owner.closed
            before = wakeups
            await asyncio.sleep(0.2)
            assert wakeups - before < 5, f"{wakeups - before} wakeups in 0.2 s: it spins"
            got = await rig.recv_exact(rig.backend, len(sent))
            assert hashlib.sha256(got).digest() == hashlib.sha256(bytes(sent)).digest()
            await rig.until(lambda: rig.owner.closed)
        finally:
            rig.close()
        assert not rig.errors

    run_on(loop_name, main())
