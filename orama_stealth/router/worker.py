"""One worker process: an asyncio event loop (uvloop when installed) that accepts, admits and
hands each connection to `connection.Conn`; the relay's epoll is one more reader of the loop.

The loop runs: accepts (a reader per listening socket), the hello and dial waits, every timer
(hello and dial deadlines, dial retries, the idle/half-close sweep, publishing counters),
signals, name lookups and the control channel to the supervisor. The route table is a single
reference that a reload replaces; a connection reads it once, when its hello is complete, so
swapping never disturbs connections in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import signal
import socket
from typing import Any

from orama_stealth.router import control
from orama_stealth.router.admission import (
    REFUSED_GLOBAL,
    LocalAdmission,
    SharedAdmission,
    address_key,
)
from orama_stealth.router.config import ConfigError, Listener, RouterConfig, parse_config
from orama_stealth.router.connection import Conn, Context, Stage, plain_ip
from orama_stealth.router.logs import Logger
from orama_stealth.router.loop import choose
from orama_stealth.router.metrics import Stats, StatsRegion
from orama_stealth.router.relay import Relay

PUBLISH_EVERY = 0.25
ACCEPT_PAUSE = 0.1
# Connections a newcomer may evict at the cap before it is refused: more than one only when
# another worker took the freed place in the same instant.
EVICT_TRIES = 4
_AGAIN = (BlockingIOError, InterruptedError)
_NO_DESCRIPTOR = (errno.EMFILE, errno.ENFILE)
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Worker:
    def __init__(
        self,
        index: int,
        cfg: RouterConfig,
        listeners: list[tuple[Listener, socket.socket]],
        admission: LocalAdmission | SharedAdmission,
        region: StatsRegion,
        control_sock: socket.socket | None,
        log: Logger,
    ) -> None:
        self.index = index
        self.cfg = cfg
        self.listeners = listeners
        self.admission = admission
        self.region = region
        self.control_sock = control_sock
        self.log = log
        self.stats = Stats()
        self.draining = False
        self.loop_name = "asyncio"
        self.exit_code = 0
        self._channel: control.Channel | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._ctx: Context | None = None
        self.relay: Relay | None = None
        # One descriptor held in reserve: out of descriptors, it is given up for a moment to
        # accept a waiting connection and close it, so the client is refused at once instead
        # of waiting in the queue, and the listener does not stay readable (see _on_accept).
        self._spare = -1

    @property
    def ctx(self) -> Context:
        assert self._ctx is not None, "the worker is not running"
        return self._ctx

    # --- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        """The worker process's whole life: a fresh event loop until drained."""
        self.loop_name, factory = choose()
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(self.serve())

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        await self.start(loop)
        assert self._stopped is not None
        try:
            await self._stopped
        finally:
            self._publish()
            self.close()
        return self.exit_code

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Everything but waiting: also what the in-process tests call."""
        self._stopped = loop.create_future()
        loop.set_exception_handler(self._loop_error)
        self.relay = Relay(self.stats, self._callback_error)
        self._ctx = ctx = Context(loop, self.cfg, self.admission, self.stats, self.log,
                                  self.relay)
        ctx.on_closed = self._conn_closed
        loop.add_reader(self.relay.fileno(), self.relay.on_ready)
        with contextlib.suppress(RuntimeError, ValueError):  # not in the main thread (tests)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.drain)
            for sig in (signal.SIGHUP, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_IGN)
        for listener, sock in self.listeners:
            sock.setblocking(False)
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET,
                                                                  socket.AF_INET6):
                # Accepted sockets inherit TCP_NODELAY from their listener: one setsockopt
                # here instead of one per connection.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            loop.add_reader(sock.fileno(), self._acceptor(sock, listener))
        if self.control_sock is not None:
            _transport, self._channel = await loop.connect_accepted_socket(
                lambda: control.Channel(self._on_control, self._control_lost),
                sock=self.control_sock,
            )
            self._channel.send(control.ready(self.loop_name))
        self._spare = _open_spare()
        loop.call_later(PUBLISH_EVERY, self._tick)
        loop.call_later(self._sweep_interval(), self._sweep)

    def close(self) -> None:
        loop = self.ctx.loop
        for conn in list(self.ctx.registry):
            conn.close()
        if self.relay is not None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self.relay.fileno())
            self.relay.close()
        self._close_listeners()
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1
        if self._channel is not None and self._channel.transport is not None:
            self._channel.transport.close()

    def stop(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if exc is None:
            exc = RuntimeError(str(context.get("message")))
        self._callback_error(exc, context.get("handle") or context.get("message"))

    def _callback_error(self, exc: BaseException, where: object) -> None:
        self.stats.callback_errors += 1
        self.log.limited(
            "callback_error", "unexpected error in a connection callback",
            error=f"{type(exc).__name__}: {exc}"[:200],
            where=getattr(where, "__qualname__", type(where).__name__),
        )

    def _tick(self) -> None:
        self._publish()
        self.log.flush_suppressed()
        if self._spare < 0:
            self._spare = _open_spare()  # given up while the system was out of descriptors
        self.ctx.loop.call_later(PUBLISH_EVERY, self._tick)

    def _publish(self) -> None:
        snap = self.stats.snapshot()
        snap["tracked"] = self.admission.tracked() if self.region.workers == 1 else 0
        self.region.publish(self.index, snap)

    def _close_listeners(self) -> None:
        loop = self.ctx.loop
        for _listener, sock in self.listeners:
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
                sock.close()

    def drain(self) -> None:
        """Stop accepting; live connections may finish until drain_timeout."""
        if self.draining:
            return
        self.draining = True
        ctx = self.ctx
        self._close_listeners()
        self.log.info(
            "worker_draining", "draining connections", worker=self.index,
            live=len(ctx.registry), drain_timeout=ctx.cfg.drain_timeout,
        )
        # A half-closed connection whose remaining peer already left must not hold the stop
        # for the whole drain_timeout: look at each one now rather than at the next sweep.
        for conn in ctx.registry.stage(Stage.RELAY):
            if conn.half_since:
                conn.poll_open_half()
        if not len(ctx.registry):
            self.stop()
            return
        ctx.loop.call_later(ctx.cfg.drain_timeout, self._drain_deadline)

    def _drain_deadline(self) -> None:
        registry = self.ctx.registry
        left = len(registry)
        if left:
            self.log.info(
                "drain_timeout", "drain timeout reached, closing remaining connections",
                worker=self.index, closed=left,
            )
        for conn in list(registry):
            conn.close()
        self.stop()

    def _conn_closed(self) -> None:
        if self.draining and not len(self.ctx.registry):
            self.stop()

    # --- control messages from the supervisor ------------------------------------------------

    def _control_lost(self) -> None:
        # The supervisor is gone: nobody will restart or reload us, so wind down.
        self._channel = None
        self.drain()

    def _on_control(self, msg: control.Message) -> None:
        if msg["type"] == "reload":
            try:
                new = parse_config(str(msg["text"]), str(msg["path"]))
            except ConfigError as e:  # the supervisor validated this very text
                self.log.error("reload_failed", "configuration rejected", error=str(e))
                return
            self.apply(new.with_runtime_of(self.cfg))

    def apply(self, cfg: RouterConfig) -> None:
        """Swap in a reloaded config: new connections use it, live ones are untouched."""
        self.cfg = cfg
        self.ctx.apply(cfg)

    # --- accept ------------------------------------------------------------------------------

    def _acceptor(self, lsock: socket.socket, listener: Listener) -> functools.partial[None]:
        # The family is read once here: socket.family builds an enum member on every access.
        return functools.partial(self._on_accept, lsock, int(lsock.family), listener)

    def _on_accept(self, lsock: socket.socket, family: int, listener: Listener) -> None:
        # One connection per readiness report: the loop reports the listener again while more
        # are queued, so no accept(2) is spent on an EAGAIN (one per connection at ordinary
        # rates), and a burst is interleaved with the traffic of the connections already
        # admitted instead of starving it. _accept() gives the bare descriptor: accept() would
        # wrap it in a socket object that the relay drops again anyway.
        try:
            cfd, addr = lsock._accept()  # type: ignore[attr-defined]
        except _AGAIN:
            return
        except OSError as e:
            if e.errno in _OUT_OF_RESOURCES:
                self._accept_failed(lsock, listener, e.errno)
            return
        self.admit(cfd, family, addr, listener)

    def _accept_failed(self, lsock: socket.socket, listener: Listener, err: int) -> None:
        """accept(2) failed for want of resources. The listener stays readable (the connection
        is still queued), so doing nothing would spin. Out of descriptors, the spare one makes
        room to take the connection off the queue and close it: the client is refused at once
        and the next one is looked at when it arrives. Without a spare (or out of memory),
        accepting pauses for ACCEPT_PAUSE. Live connections are served throughout, and
        accepting resumes by itself as descriptors come back."""
        name = errno.errorcode.get(err, str(err))
        self.stats.accept_failures[name] += 1
        refused = err in _NO_DESCRIPTOR and self._refuse_with_spare(lsock)
        self.log.tally(
            "accept_failed", "accept failed: out of resources, connection refused",
            kind=f"accept_failed:{name}", errno=name, listener=listener.name,
            action="refused" if refused else "paused", live=len(self.ctx.registry),
        )
        if not refused:
            self._pause_accept(lsock, listener)

    def _refuse_with_spare(self, lsock: socket.socket) -> bool:
        if self._spare < 0:
            return False
        os.close(self._spare)
        self._spare = -1
        try:
            cfd, _addr = lsock._accept()  # type: ignore[attr-defined]
        except OSError:
            pass  # gone meanwhile, or the system-wide table refilled at once
        else:
            # Its unread hello makes close(2) send a reset: refused, not a silent FIN.
            os.close(cfd)
        self._spare = _open_spare()
        return True

    def _pause_accept(self, lsock: socket.socket, listener: Listener) -> None:
        """Out of resources and no spare: stop accepting for a moment instead of spinning."""
        loop = self.ctx.loop
        fd = lsock.fileno()
        loop.remove_reader(fd)

        def resume() -> None:
            if not self.draining and lsock.fileno() >= 0:
                loop.add_reader(fd, self._acceptor(lsock, listener))

        loop.call_later(ACCEPT_PAUSE, resume)

    def admit(self, cfd: int, family: int, addr: tuple[str, int], listener: Listener) -> None:
        """A freshly accepted descriptor: counted in (or refused), then its connection starts."""
        ip = plain_ip(addr[0])
        # The address key is only looked at by the per-address cap.
        key = address_key(ip) if self.admission.max_per_ip > 0 else b""
        admission = self.admission
        verdict, tracked = admission.admit(key)
        if verdict == REFUSED_GLOBAL:
            verdict, tracked = self._make_room(key)
        if verdict:
            scope = "global" if verdict == REFUSED_GLOBAL else "per_ip"
            self.stats.refused[scope] += 1
            limit = self.admission.max_total if scope == "global" else self.admission.max_per_ip
            self.log.limited(
                "conn_limit", "Connection limit reached", kind=f"conn_limit:{scope}", limit=scope,
                max=limit, client=f"{ip}:{addr[1]}", listener=listener.name,
            )
            os.close(cfd)
            return
        os.set_blocking(cfd, False)
        self.stats.active += 1
        registry = self.ctx.registry
        if (
            registry.count(Stage.HELLO)
            and admission.mine() > admission.share
            and admission.total() >= admission.max_total
        ):
            # At the cap with more than its share: give a place back, so that a worker whose
            # own share is all established connections still has room for a newcomer.
            oldest = registry.oldest(Stage.HELLO)
            if oldest is not None:
                self._evict(oldest)
        Conn(self.ctx, cfd, family, ip, addr[1], key, tracked, listener).start()

    def _make_room(self, key: bytes) -> tuple[int, bool]:
        """At the global cap: close this worker's oldest connections that have not completed
        their hello yet until the newcomer fits. Established connections are never evicted;
        with none in hello, the newcomer is refused."""
        registry = self.ctx.registry
        verdict, tracked = REFUSED_GLOBAL, False
        for _ in range(EVICT_TRIES):
            oldest = registry.oldest(Stage.HELLO)
            if oldest is None:
                break
            self._evict(oldest)
            verdict, tracked = self.admission.admit(key)
            if verdict != REFUSED_GLOBAL:
                break
        return verdict, tracked

    def _evict(self, conn: Conn) -> None:
        self.stats.hello_evicted += 1
        self.log.tally(
            "hello_evicted", "connection without a complete hello evicted at the cap",
            max=self.admission.max_total, client=f"{conn.ip}:{conn.port}",
            listener=conn.listener.name,
        )
        conn.evict()

    # --- idle and half-close sweep ----------------------------------------------------------

    def _sweep_interval(self) -> float:
        """A tenth of the shortest timeout the sweep enforces (so it is late by at most 10%),
        between 50 ms and 5 s. half_close_timeout is always set, so the sweep always runs."""
        shortest = self.cfg.half_close_timeout
        if 0 < self.cfg.idle_timeout < shortest:
            shortest = self.cfg.idle_timeout
        return min(5.0, max(0.05, shortest / 10))

    def _sweep(self) -> None:
        ctx = self.ctx
        cfg = ctx.cfg
        idle = cfg.idle_timeout
        half = cfg.half_close_timeout
        now = ctx.loop.time()
        idle_expired: list[Conn] = []
        half_expired: list[Conn] = []
        polled: list[Conn] = []
        for conn in ctx.registry.stage(Stage.RELAY):
            up, down = conn.up, conn.down
            if up is None or down is None:
                continue
            if up.fold() + down.fold():
                # Bytes still flowing in the open direction restart the half-close clock too
                # (like HAProxy's client-fin/server-fin): a long download after the client's
                # FIN is not cut, a peer that went silent without closing is.
                conn.idle_since = now
                if conn.half_since:
                    conn.half_since = now
            elif conn.half_since:
                if now - conn.half_since >= half:
                    half_expired.append(conn)
                else:
                    polled.append(conn)
            elif idle > 0 and now - conn.idle_since >= idle:
                idle_expired.append(conn)
        for conn in idle_expired:
            self.stats.idle_closed += 1
            conn.close()
        for conn in polled:
            conn.poll_open_half()
        for conn in half_expired:
            self.stats.half_close_closed += 1
            up = conn.up
            backend = conn.backend
            self.log.limited(
                "half_close_timeout", "half-closed connection timed out",
                finished="client" if up is not None and up.done else "backend",
                waiting_for="backend" if up is not None and up.done else "client",
                timeout=half, backend=backend.name if backend is not None else None,
                client=f"{conn.ip}:{conn.port}",
            )
            conn.close()
        ctx.loop.call_later(self._sweep_interval(), self._sweep)


def _open_spare() -> int:
    """The reserve descriptor (any cheap one: an eventfd needs no filesystem); -1 when none
    can be had right now."""
    try:
        return os.eventfd(0, os.EFD_CLOEXEC)
    except OSError:
        return -1
