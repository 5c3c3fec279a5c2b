"""One client connection, from accept to close, as an explicit sequence of phases.

    HELLO ──▶ HELLO_WAIT ─┐               ┌─▶ DIAL_WAIT ─┐
      │                   ▼               │              ▼
      └────────────────▶ DIAL ──▶ (connect) ──────────▶ RELAY ──▶ CLOSED
                          ▲  └─▶ RESOLVE ─┘│
                          └── DIAL_RETRY ◀─┘  (refused: retried until backend_dial_timeout)

Any phase may go to CLOSED. What the connection has registered with the asyncio loop follows
from its phase: HELLO_WAIT has a reader on the client socket and the hello timer, DIAL_WAIT a
writer on the backend socket, DIAL_RETRY a retry timer, and the dial phases after the first
attempt the dial deadline; RELAY is in the relay's epoll, not in the loop. Each worker keeps
its connections in a `Registry` by stage (hello, dial, relay), oldest first.

Most connections never wait at all: with TCP_DEFER_ACCEPT the hello is there at accept, and a
loopback backend connects inside connect(2), so HELLO -> DIAL -> RELAY happens in one call.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import enum
import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator

from orama_stealth.router.admission import LocalAdmission, SharedAdmission
from orama_stealth.router.config import Backend, Listener, RouterConfig
from orama_stealth.router.dial import IN_PROGRESS, open_backend
from orama_stealth.router.dns import Resolver
from orama_stealth.router.logs import Logger
from orama_stealth.router.metrics import Stats
from orama_stealth.router.relay import Half, Relay, read_exact_size
from orama_stealth.router.routes import RouteTable
from orama_stealth.wire.clienthello import (
    ClientHelloReader,
    HelloError,
    Malformed,
    NoSNI,
    NotTLS,
    TooLarge,
    Truncated,
)
from orama_stealth.wire.proxyproto import ProxyProtocolError
from orama_stealth.wire.proxyproto import encode as proxy_encode

# First retry of a refused dial; doubles up to the cap, always within backend_dial_timeout.
RETRY_FIRST = 0.02
RETRY_CAP = 0.25
_RETRYABLE = (errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED)
_AGAIN = (BlockingIOError, InterruptedError)
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close(2) sends a reset


class Phase(enum.Enum):
    HELLO = "hello"  # reading the ClientHello; nothing registered yet
    HELLO_WAIT = "hello_wait"  # the rest of the hello is awaited: reader + hello timer
    DIAL = "dial"  # opening the backend connection
    RESOLVE = "resolve"  # waiting for the backend's name to resolve
    DIAL_WAIT = "dial_wait"  # connect(2) in progress: writer on the backend socket
    DIAL_RETRY = "dial_retry"  # the backend refused: a retry timer
    RELAY = "relay"  # both directions pumped by the relay
    CLOSED = "closed"


class Stage(enum.Enum):
    """What a worker groups its connections by (the registry's buckets)."""

    HELLO = "hello"
    DIAL = "dial"
    RELAY = "relay"


STAGE = {
    Phase.HELLO: Stage.HELLO,
    Phase.HELLO_WAIT: Stage.HELLO,
    Phase.DIAL: Stage.DIAL,
    Phase.RESOLVE: Stage.DIAL,
    Phase.DIAL_WAIT: Stage.DIAL,
    Phase.DIAL_RETRY: Stage.DIAL,
    Phase.RELAY: Stage.RELAY,
}


class Registry:
    """A worker's live connections by stage, each bucket in arrival order (oldest first)."""

    __slots__ = ("_by_stage",)

    def __init__(self) -> None:
        self._by_stage: dict[Stage, dict[Conn, None]] = {s: {} for s in Stage}

    def add(self, conn: Conn, stage: Stage) -> None:
        self._by_stage[stage][conn] = None

    def move(self, conn: Conn, old: Stage, new: Stage) -> None:
        del self._by_stage[old][conn]
        self._by_stage[new][conn] = None

    def remove(self, conn: Conn, stage: Stage) -> None:
        self._by_stage[stage].pop(conn, None)

    def stage(self, stage: Stage) -> Iterator[Conn]:
        """The connections of one stage, oldest first (a snapshot: safe to close while going)."""
        return iter(list(self._by_stage[stage]))

    def oldest(self, stage: Stage) -> Conn | None:
        """The connection of that stage that arrived first, without copying the bucket."""
        return next(iter(self._by_stage[stage]), None)

    def count(self, stage: Stage) -> int:
        return len(self._by_stage[stage])

    def __len__(self) -> int:
        return sum(len(d) for d in self._by_stage.values())

    def __iter__(self) -> Iterator[Conn]:
        return iter([c for d in self._by_stage.values() for c in d])


class Context:
    """What a worker's connections share: the loop, the live config, counters and services."""

    __slots__ = (
        "admission", "cfg", "log", "loop", "on_closed", "registry", "relay", "resolver",
        "stats", "table",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        cfg: RouterConfig,
        admission: LocalAdmission | SharedAdmission,
        stats: Stats,
        log: Logger,
        relay: Relay,
    ) -> None:
        self.loop = loop
        self.cfg = cfg
        self.table = RouteTable.from_config(cfg)
        self.admission = admission
        self.stats = stats
        self.log = log
        self.relay = relay
        self.resolver = Resolver(loop)
        self.registry = Registry()
        self.on_closed: Callable[[], None] = _nothing  # after each connection's close

    def apply(self, cfg: RouterConfig) -> None:
        """A reloaded config: new connections use it, live ones are untouched."""
        self.table = RouteTable.from_config(cfg)
        self.admission.set_limits(cfg.max_concurrent_conns, cfg.max_conns_per_ip)
        self.cfg = cfg


def _nothing() -> None:
    pass


def _hello_reason(e: HelloError) -> str:
    if isinstance(e, Truncated):
        return "truncated"
    if isinstance(e, TooLarge):
        return "too_large"
    if isinstance(e, Malformed):
        return "malformed"
    if isinstance(e, NotTLS):
        return "not_tls"
    return "invalid"


def plain_ip(ip: str) -> str:
    """IPv4-mapped IPv6 (what a dual-stack socket reports) as plain IPv4; scope ids dropped."""
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip.split("%", 1)[0]


def local_address(fd: int, family: int) -> tuple[str, int]:
    """getsockname() of a bare descriptor, as (plain ip, port)."""
    sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
    try:
        host, port = sock.getsockname()[:2]
    finally:
        sock.detach()
    return plain_ip(host), port


class Conn:
    """One admitted client connection. `phase` says where it is and what it holds."""

    __slots__ = (
        "backend",
        "bfd",
        "bsock",
        "cfd",
        "ctx",
        "deadline",
        "down",
        "family",
        "half_since",
        "head",
        "idle_since",
        "ip",
        "key",
        "last_error",
        "listener",
        "phase",
        "port",
        "reader",
        "retry",
        "timer",
        "tracked",
        "up",
        "watched",
    )

    def __init__(
        self, ctx: Context, cfd: int, family: int, ip: str, port: int, key: bytes, tracked: bool,
        listener: Listener,
    ) -> None:
        self.ctx = ctx
        self.phase = Phase.HELLO
        self.cfd = cfd
        self.family = family
        self.ip = ip
        self.port = port
        self.key = key
        self.tracked = tracked
        self.listener = listener
        self.reader: ClientHelloReader | None = None
        self.timer: asyncio.TimerHandle | None = None  # hello timeout, then dial deadline
        self.retry: asyncio.TimerHandle | None = None
        self.backend: Backend | None = None
        self.bsock: _socket.socket | None = None
        self.bfd = -1
        self.head = b""
        self.up: Half | None = None
        self.down: Half | None = None
        self.deadline = 0.0
        self.idle_since = 0.0
        self.half_since = 0.0  # when the first direction finished; 0 while both run
        self.last_error = ""
        self.watched = False  # the client socket is in the relay's epoll for its reset

    def start(self) -> None:
        """Admitted: read the hello, or dial at once on a plain TCP listener."""
        listener = self.listener
        if listener.backend is not None and listener.mode == "tcp":
            self.ctx.registry.add(self, Stage.DIAL)
            self.phase = Phase.DIAL
            self.dial(listener.backend, b"")
        else:
            self.ctx.registry.add(self, Stage.HELLO)
            self._start_hello()

    def _enter(self, phase: Phase) -> None:
        old, new = STAGE[self.phase], STAGE[phase]
        if old is not new:
            self.ctx.registry.move(self, old, new)
        self.phase = phase

    # --- hello -------------------------------------------------------------------------------

    def _start_hello(self) -> None:
        """Most clients send the hello with the handshake's last ACK, so try at once: when it
        is already there, the connection never registers with the loop for it."""
        self.reader = ClientHelloReader()
        self._on_hello()
        if self.phase is Phase.HELLO:
            ctx = self.ctx
            self.phase = Phase.HELLO_WAIT
            ctx.loop.add_reader(self.cfd, self._on_hello)
            self.timer = ctx.loop.call_later(ctx.cfg.client_hello_timeout, self._hello_timeout)

    def _on_hello(self) -> None:
        reader = self.reader
        if reader is None:
            return
        try:
            data = read_exact_size(self.cfd)
        except _AGAIN:
            return
        except OSError as e:
            self._hello_failed("reset", str(e))
            return
        ctx = self.ctx
        table = ctx.table
        try:
            hello = reader.feed_eof() if not data else reader.feed(data)
            if hello is None:
                return
            backend, _rule = table.pick(hello.sni, hello.alpn)
            head = hello.raw
        except NoSNI as e:
            backend, _rule = table.pick(None, e.hello.alpn)
            head = e.hello.raw
        except NotTLS as e:
            if ctx.cfg.non_tls != "fallback":
                self._hello_failed("not_tls", e.message)
                return
            backend = table.pick(None)[0]
            head = e.consumed
        except HelloError as e:
            self._hello_failed(_hello_reason(e), e.message)
            return
        self.reader = None
        if self.phase is Phase.HELLO_WAIT:
            ctx.loop.remove_reader(self.cfd)
            self._cancel_timer()
        self._enter(Phase.DIAL)
        self.dial(backend, head)

    def _hello_timeout(self) -> None:
        self.timer = None
        limit = self.ctx.cfg.client_hello_timeout
        self._hello_failed("timeout", f"no complete ClientHello within {limit:g}s")

    def _hello_failed(self, reason: str, detail: str) -> None:
        ctx = self.ctx
        ctx.stats.hello_failures[reason] += 1
        ctx.log.limited(
            "hello_failed", "ClientHello peek failed", kind=f"hello_failed:{reason}", reason=reason,
            client=f"{self.ip}:{self.port}", detail=detail[:160],
        )
        self.close()

    # --- dial --------------------------------------------------------------------------------

    def dial(self, backend: Backend, head: bytes) -> None:
        self.backend = backend
        if backend.proxy_protocol:
            try:
                head = proxy_encode(
                    backend.proxy_protocol, (self.ip, self.port),
                    local_address(self.cfd, self.family),
                ) + head
            except (OSError, ProxyProtocolError) as e:
                self._dial_failed(f"cannot build PROXY header: {e}")
                return
        self.head = head
        self.deadline = self.ctx.loop.time() + self.ctx.cfg.backend_dial_timeout
        self._connect()

    def _arm_deadline(self) -> None:
        """The deadline timer exists only while we wait: a backend on loopback connects inside
        connect(2), and most dials never need one. While we wait, a client that resets is
        noticed at once rather than when the relay starts or the deadline passes."""
        if self.timer is None:
            self.timer = self.ctx.loop.call_at(self.deadline, self._dial_timeout)
        if not self.watched:
            self.watched = True
            self.ctx.relay.watch(self.cfd, self._client_reset)

    def _client_reset(self) -> None:
        self.close()

    def _connect(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.retry = None
        self._enter(Phase.DIAL)
        backend = self.backend
        assert backend is not None
        target = self.ctx.resolver.resolve(backend, self._connect)
        if target is None:
            self._enter(Phase.RESOLVE)
            self._arm_deadline()
            return  # _connect runs again when the answer is in
        if isinstance(target, str):
            self._dial_failed(target)
            return
        try:
            s, err = open_backend(target[0], target[1], (self.ip, self.port), backend.source)
        except OSError as e:
            self._dial_failed(e.strerror if e.strerror else str(e))
            return
        self.bsock = s
        self.bfd = s.fileno()
        if err not in IN_PROGRESS:
            self._connect_error(err)
            return
        if self.head:
            # Sending tells at once whether the handshake is done: EAGAIN while it is still
            # in progress, the connect error (e.g. refused) if it failed.
            try:
                sent = s.send(self.head)
            except _AGAIN:
                pass
            except OSError as e:
                self._connect_error(e.errno or errno.ECONNREFUSED)
                return
            else:
                self._connected(sent)
                return
        elif err == 0:
            self._connected(0)
            return
        self._arm_deadline()
        self._enter(Phase.DIAL_WAIT)
        self.ctx.loop.add_writer(self.bfd, self._on_connect)

    def _on_connect(self) -> None:
        self.ctx.loop.remove_writer(self.bfd)
        self._enter(Phase.DIAL)
        assert self.bsock is not None
        err = self.bsock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._connected(0)
        else:
            self._connect_error(err)

    def _drop_backend(self) -> None:
        if self.phase is Phase.DIAL_WAIT:
            self.ctx.loop.remove_writer(self.bfd)
        if self.bsock is not None:
            self.bsock.close()
            self.bsock = None
        elif self.bfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.bfd)
        self.bfd = -1

    def _connect_error(self, err: int) -> None:
        self._drop_backend()
        self.last_error = os.strerror(err)
        # A backend restarting refuses for a moment: retry until the deadline, so a restart
        # costs latency rather than a failed connection.
        if err in _RETRYABLE:
            remaining = self.deadline - self.ctx.loop.time()
            delay = min(RETRY_CAP, max(RETRY_FIRST, remaining / 20), remaining)
            if delay > 0:
                self._arm_deadline()
                self._enter(Phase.DIAL_RETRY)
                self.retry = self.ctx.loop.call_later(delay, self._connect)
                return
        self._dial_failed(self.last_error)

    def _dial_timeout(self) -> None:
        self.timer = None
        reason = f"timeout after {self.ctx.cfg.backend_dial_timeout:g}s"
        if self.last_error:
            reason += f" (last error: {self.last_error})"
        self._dial_failed(reason)

    def _dial_failed(self, reason: str) -> None:
        ctx = self.ctx
        backend = self.backend
        assert backend is not None
        ctx.stats.dial_failures[backend.name] += 1
        ctx.log.limited(
            "dial_failed", "backend dial failed", backend=backend.name, addr=backend.addr,
            reason=reason, client=f"{self.ip}:{self.port}",
        )
        self.close()

    def _connected(self, sent: int) -> None:
        """The backend accepted; `sent` bytes of the head already went out with the probe."""
        ctx = self.ctx
        self._cancel_timer()
        backend = self.backend
        bsock = self.bsock
        assert backend is not None and bsock is not None
        first = self.head[sent:] if sent else self.head
        self.head = b""
        ctx.stats.conns[backend.name] += 1
        self.idle_since = ctx.loop.time()
        # From here on the descriptor is enough: dropping the socket object saves about
        # 0.1 KiB per idle connection; close() closes the bare descriptors.
        bsock.detach()
        self.bsock = None
        self._enter(Phase.RELAY)
        self.up, self.down = up, down = ctx.relay.pair(self, self.cfd, self.bfd)
        up.start(first)
        if self.phase is Phase.RELAY:
            down.start()

    # --- relay (called by the Halves) ----------------------------------------------------

    def half_done(self) -> None:
        up, down = self.up, self.down
        if up is not None and down is not None and up.done and down.done:
            self.close()
        elif not self.half_since:
            # The sweep closes the connection if the other side never finishes its direction.
            self.half_since = self.ctx.loop.time()

    def poll_open_half(self) -> None:
        """Look at the direction still open of a half-closed connection (see Half.poll)."""
        for half in (self.up, self.down):
            if half is not None and self.phase is Phase.RELAY:
                half.poll()

    # --- end ---------------------------------------------------------------------------------

    def evict(self) -> None:
        """Closed to make room for a newer connection: reset rather than FIN, so the kernel
        keeps no orphaned FIN_WAIT state for a peer that may never answer it."""
        with contextlib.suppress(OSError):
            sock = socket.socket(self.family, socket.SOCK_STREAM, 0, self.cfd)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            finally:
                sock.detach()
        self.close()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        phase = self.phase
        if phase is Phase.CLOSED:
            return
        ctx = self.ctx
        self._cancel_timer()
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        if phase is Phase.HELLO_WAIT:
            ctx.loop.remove_reader(self.cfd)
        # Both descriptors are closed right below, which takes them out of the relay's epoll.
        if self.up is not None:
            self.up.release()
        if self.down is not None:
            self.down.release()
        self.up = self.down = None
        if self.watched:
            ctx.relay.unwatch(self.cfd)
        self.reader = None
        self._drop_backend()
        self.phase = Phase.CLOSED
        with contextlib.suppress(OSError):
            os.close(self.cfd)
        ctx.registry.remove(self, STAGE[phase])
        ctx.stats.active -= 1
        ctx.admission.release(self.key, self.tracked)
        ctx.on_closed()
