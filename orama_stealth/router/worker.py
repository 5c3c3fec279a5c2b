"""One worker process: accept, admit, peek the ClientHello, dial, then hand over to `relay`.

Each connection is a `Conn` state machine driven by loop callbacks (hello -> dial -> relay); the
only timers are one deadline per connection while it is being set up, plus worker-wide ticks for
idle detection and for publishing counters. The route table is a single reference that a reload
replaces; a connection reads it once, when its hello is complete, so swapping never disturbs
connections in flight.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import functools
import ipaddress
import os
import pickle
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from orama_stealth.router import transparent
from orama_stealth.router.admission import REFUSED_GLOBAL, Admission, address_key
from orama_stealth.router.config import Backend, Listener, RouterConfig
from orama_stealth.router.evloop import Loop, Timer
from orama_stealth.router.logs import Logger
from orama_stealth.router.metrics import Stats, StatsRegion
from orama_stealth.router.relay import Half, read_exact_size
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
PUBLISH_EVERY = 0.25
_RETRYABLE = (errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED)
MSG_HEADER = struct.Struct("!cI")  # kind, length

AddrInfo = list[tuple[Any, Any, Any, Any, Any]]
_AGAIN = (BlockingIOError, InterruptedError)


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


def local_address(fd: int, family: int) -> tuple[str, int]:
    """getsockname() of a bare descriptor, as (plain ip, port)."""
    sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
    try:
        host, port = sock.getsockname()[:2]
    finally:
        sock.detach()
    return plain_ip(host), port


def plain_ip(ip: str) -> str:
    """IPv4-mapped IPv6 (what a dual-stack socket reports) as plain IPv4; scope ids dropped."""
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip.split("%", 1)[0]


class Conn:
    """One client connection, from accept to close."""

    __slots__ = (
        "backend",
        "bfd",
        "bsock",
        "cfd",
        "closed",
        "cwr",
        "deadline",
        "down",
        "family",
        "half_since",
        "head",
        "hrd",
        "idle_since",
        "ip",
        "key",
        "last_error",
        "listener",
        "port",
        "reader",
        "retry",
        "timer",
        "tracked",
        "up",
        "w",
    )

    def __init__(
        self, w: Worker, cfd: int, family: int, ip: str, port: int, key: bytes, tracked: bool,
        listener: Listener,
    ) -> None:
        self.w = w
        self.cfd = cfd
        self.family = family
        self.bsock: _socket.socket | None = None
        self.bfd = -1
        self.ip = ip
        self.port = port
        self.key = key
        self.tracked = tracked
        self.listener = listener
        self.reader: ClientHelloReader | None = None
        self.timer: Timer | None = None
        self.retry: Timer | None = None
        self.backend: Backend | None = None
        self.head = b""
        self.up: Half | None = None
        self.down: Half | None = None
        self.closed = False
        self.hrd = False  # reader registered while the hello arrives
        self.cwr = False  # writer registered while connect(2) completes
        self.deadline = 0.0
        self.idle_since = 0.0
        self.half_since = 0.0  # when the first direction finished; 0 while both run
        self.last_error = ""

    # --- hello -------------------------------------------------------------------------------

    def start_hello(self) -> None:
        """Read the hello. Most clients send it with the handshake's last ACK, so try at once:
        when it is already there, the connection never registers with the loop for it."""
        self.reader = ClientHelloReader()
        self._on_hello()
        if self.reader is not None and not self.closed:
            w = self.w
            self.hrd = True
            w.loop.add_reader(self.cfd, self._on_hello)
            self.timer = w.loop.call_later(w.cfg.client_hello_timeout, self._hello_timeout)

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
        table = self.w.table
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
            if self.w.cfg.non_tls != "fallback":
                self._hello_failed("not_tls", e.message)
                return
            backend = table.pick(None)[0]
            head = e.consumed
        except HelloError as e:
            self._hello_failed(_hello_reason(e), e.message)
            return
        self.reader = None
        if self.hrd:
            self.hrd = False
            self.w.loop.remove_reader(self.cfd)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.dial(backend, head)

    def _hello_timeout(self) -> None:
        self.timer = None
        limit = self.w.cfg.client_hello_timeout
        self._hello_failed("timeout", f"no complete ClientHello within {limit:g}s")

    def _hello_failed(self, reason: str, detail: str) -> None:
        w = self.w
        w.stats.hello_failures[reason] += 1
        w.log.limited(
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
        self.deadline = self.w.loop.time() + self.w.cfg.backend_dial_timeout
        self._connect()

    def _arm_dial_timer(self) -> None:
        """The deadline timer exists only while we wait: a backend on loopback connects inside
        connect(2), and most dials never need one."""
        if self.timer is None:
            self.timer = self.w.loop.call_at(self.deadline, self._dial_timeout)

    def _connect(self) -> None:
        self.retry = None
        if self.closed:
            return
        backend = self.backend
        assert backend is not None
        target = self.w.resolve(backend, self._connect)
        if target is None:
            self._arm_dial_timer()
            return  # resolving; _connect runs again when the answer is in
        if isinstance(target, str):
            self._dial_failed(target)
            return
        family, sockaddr = target
        try:
            # The C socket type: socket.socket's Python layer (io refs, enum properties) is
            # never used, and the object is dropped once connected anyway.
            s = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            self._dial_failed(str(e))
            return
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.bsock = s
        self.bfd = s.fileno()
        if backend.source == "client":
            try:
                transparent.bind_client_source(s, family, self.ip, self.port)
            except OSError as e:
                self._dial_failed(f"source client {self.ip}: {e} (needs CAP_NET_ADMIN)")
                return
        err = s.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
            self._connect_error(err)
            return
        if self.head:
            # Sending tells at once whether the handshake is done: EAGAIN while it is still
            # in progress, the connect error (e.g. refused) if it failed.
            try:
                sent = s.send(self.head)
            except (BlockingIOError, InterruptedError):
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
        self._arm_dial_timer()
        self.cwr = True
        self.w.loop.add_writer(self.bfd, self._on_connect)

    def _on_connect(self) -> None:
        self.cwr = False
        self.w.loop.remove_writer(self.bfd)
        assert self.bsock is not None
        err = self.bsock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._connected(0)
        else:
            self._connect_error(err)

    def _drop_backend(self) -> None:
        if self.bsock is not None:
            if self.cwr:
                self.cwr = False
                self.w.loop.forget(self.bfd)
            self.bsock.close()
            self.bsock = None
            self.bfd = -1
        elif self.bfd >= 0:
            self.w.loop.forget(self.bfd)
            with contextlib.suppress(OSError):
                os.close(self.bfd)
            self.bfd = -1

    def _connect_error(self, err: int) -> None:
        self._drop_backend()
        self.last_error = os.strerror(err)
        # A backend restarting refuses for a moment: retry until the deadline, so a restart
        # costs latency rather than a failed connection.
        if err in _RETRYABLE:
            remaining = self.deadline - self.w.loop.time()
            delay = min(RETRY_CAP, max(RETRY_FIRST, remaining / 20), remaining)
            if delay > 0:
                self._arm_dial_timer()
                self.retry = self.w.loop.call_later(delay, self._connect)
                return
        self._dial_failed(self.last_error)

    def _dial_timeout(self) -> None:
        self.timer = None
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        self._drop_backend()
        reason = f"timeout after {self.w.cfg.backend_dial_timeout:g}s"
        if self.last_error:
            reason += f" (last error: {self.last_error})"
        self._dial_failed(reason)

    def _dial_failed(self, reason: str) -> None:
        w = self.w
        backend = self.backend
        assert backend is not None
        w.stats.dial_failures[backend.name] += 1
        w.log.limited(
            "dial_failed", "backend dial failed", backend=backend.name, addr=backend.addr,
            reason=reason, client=f"{self.ip}:{self.port}",
        )
        self.close()

    def _connected(self, sent: int) -> None:
        """The backend accepted; `sent` bytes of the head already went out with the probe."""
        w = self.w
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        backend = self.backend
        bsock = self.bsock
        assert backend is not None and bsock is not None
        first = self.head[sent:] if sent else self.head
        self.head = b""
        w.stats.conns[backend.name] += 1
        self.idle_since = w.loop.time()
        # From here on the descriptor is enough: dropping the socket object saves about
        # 0.1 KiB per idle connection; close() closes the bare descriptors.
        bsock.detach()
        self.bsock = None
        self.up = Half(self, self.cfd, self.bfd, True, w.loop, w.stats)
        self.down = Half(self, self.bfd, self.cfd, False, w.loop, w.stats)
        self.up.start(first)
        if not self.closed:
            self.down.start()

    # --- end ---------------------------------------------------------------------------------

    def other_done(self, half: Half) -> bool:
        other = self.down if half is self.up else self.up
        return other is not None and other.done

    def half_done(self) -> None:
        up, down = self.up, self.down
        if up is not None and down is not None and up.done and down.done:
            self.close()
        elif not self.half_since:
            # The sweep closes the connection if the other side never finishes its direction.
            self.half_since = self.w.loop.time()

    def poll_open_half(self) -> None:
        """Look at the direction still open of a half-closed connection (see Half.poll)."""
        for half in (self.up, self.down):
            if half is not None and not self.closed:
                half.poll()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        w = self.w
        loop = w.loop
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        # Both descriptors are closed right below, which takes them out of the epoll set.
        if self.up is not None:
            self.up.release()
        if self.down is not None:
            self.down.release()
        self.reader = None
        self.hrd = False
        self.up = self.down = None
        self._drop_backend()
        loop.forget(self.cfd)
        with contextlib.suppress(OSError):
            os.close(self.cfd)
        w.conn_closed(self)


class Worker:
    def __init__(
        self,
        index: int,
        cfg: RouterConfig,
        listeners: list[tuple[Listener, socket.socket]],
        admission: Admission,
        region: StatsRegion,
        control: socket.socket,
        log: Logger,
    ) -> None:
        self.index = index
        self.cfg = cfg
        self.table = RouteTable.from_config(cfg)
        self.listeners = listeners
        self.admission = admission
        self.region = region
        self.control = control
        self.log = log
        self.stats = Stats()
        self.conns: set[Conn] = set()
        self.draining = False
        self.loop_name = "epoll"
        self.loop = Loop(on_error=self._callback_error)
        self._control_buf = b""
        self._resolved: dict[str, tuple[float, tuple[int, tuple[str, int]] | str]] = {}
        self._resolving: dict[str, list[Callable[[], None]]] = {}
        self.exit_code = 0

    def _callback_error(self, exc: BaseException, cb: object) -> None:
        self.stats.callback_errors += 1
        self.log.limited(
            "callback_error", "unexpected error in a connection callback",
            error=f"{type(exc).__name__}: {exc}"[:200],
            where=getattr(cb, "__qualname__", type(cb).__name__),
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        loop = self.loop
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
        self.control.setblocking(False)
        loop.add_reader(self.control.fileno(), self._on_control)
        self._send_control(f"ready {self.loop_name}\n".encode())
        loop.call_later(PUBLISH_EVERY, self._tick)
        loop.call_later(self._sweep_interval(), self._sweep)
        try:
            loop.run_forever()
        finally:
            self._publish()
            loop.close()
        return self.exit_code

    def _send_control(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.control.send(data)

    def _tick(self) -> None:
        self._publish()
        self.log.flush_suppressed()
        self.loop.call_later(PUBLISH_EVERY, self._tick)

    def _publish(self) -> None:
        snap = self.stats.snapshot()
        snap["tracked"] = self.admission.tracked() if self.region.workers == 1 else 0
        self.region.publish(self.index, snap)

    def drain(self) -> None:
        """Stop accepting; live connections may finish until drain_timeout."""
        if self.draining:
            return
        self.draining = True
        for _listener, sock in self.listeners:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self.log.info(
            "worker_draining", "draining connections", worker=self.index, live=len(self.conns),
            drain_timeout=self.cfg.drain_timeout,
        )
        if not self.conns:
            self.loop.stop()
            return
        # A half-closed connection whose remaining peer already left must not hold the stop
        # for the whole drain_timeout: look at each one now rather than at the next sweep.
        for conn in [c for c in self.conns if c.half_since]:
            conn.poll_open_half()
        if self.conns:
            self.loop.call_later(self.cfg.drain_timeout, self._drain_deadline)

    def _drain_deadline(self) -> None:
        left = len(self.conns)
        if left:
            self.log.info(
                "drain_timeout", "drain timeout reached, closing remaining connections",
                worker=self.index, closed=left,
            )
        for conn in list(self.conns):
            conn.close()
        self.loop.stop()

    def conn_closed(self, conn: Conn) -> None:
        self.conns.discard(conn)
        self.stats.active -= 1
        self.admission.release(conn.key, conn.tracked)
        if self.draining and not self.conns:
            self.loop.stop()

    # --- control messages from the supervisor ------------------------------------------------

    def _on_control(self) -> None:
        try:
            data = self.control.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            # The supervisor is gone: nobody will restart or reload us, so wind down.
            self.loop.remove_reader(self.control.fileno())
            self.drain()
            return
        self._control_buf += data
        while len(self._control_buf) >= MSG_HEADER.size:
            kind, length = MSG_HEADER.unpack_from(self._control_buf)
            end = MSG_HEADER.size + length
            if len(self._control_buf) < end:
                return
            body = self._control_buf[MSG_HEADER.size : end]
            self._control_buf = self._control_buf[end:]
            if kind == b"C":
                self.apply(pickle.loads(body))

    def apply(self, cfg: RouterConfig) -> None:
        """Swap in a reloaded config: new connections use it, live ones are untouched."""
        self.table = RouteTable.from_config(cfg)
        self.admission.set_limits(cfg.max_concurrent_conns, cfg.max_conns_per_ip)
        self.cfg = cfg

    # --- accept ------------------------------------------------------------------------------

    def _acceptor(self, lsock: socket.socket, listener: Listener) -> Callable[[], None]:
        # The family is read once here: socket.family builds an enum member on every access.
        return functools.partial(self._on_accept, lsock, int(lsock.family), listener)

    def _on_accept(self, lsock: socket.socket, family: int, listener: Listener) -> None:
        # One connection per readiness report: level-triggered epoll reports the listener again
        # while more are queued, so no accept(2) is spent on an EAGAIN (one per connection at
        # ordinary rates), and a burst is interleaved with the traffic of the connections
        # already admitted instead of starving it. _accept() gives the bare descriptor: accept()
        # would wrap it in a socket object that the relay drops again anyway.
        try:
            cfd, addr = lsock._accept()  # type: ignore[attr-defined]
        except _AGAIN:
            return
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.log.limited(
                    "accept_failed", "accept failed", listener=listener.name, reason=str(e)
                )
                self._pause_accept(lsock, listener)
            return
        self._admit(cfd, family, addr, listener)

    def _pause_accept(self, lsock: socket.socket, listener: Listener) -> None:
        """Out of descriptors: stop accepting for a moment instead of spinning on the error."""
        fd = lsock.fileno()
        self.loop.remove_reader(fd)

        def resume() -> None:
            if not self.draining and lsock.fileno() >= 0:
                self.loop.add_reader(fd, self._acceptor(lsock, listener))

        self.loop.call_later(0.1, resume)

    def _admit(self, cfd: int, family: int, addr: tuple[str, int], listener: Listener) -> None:
        ip = plain_ip(addr[0])
        # The address key is only looked at by the per-address cap.
        key = address_key(ip) if self.admission.max_per_ip > 0 else b""
        verdict, tracked = self.admission.admit(key)
        if verdict:
            scope = "global" if verdict == REFUSED_GLOBAL else "per_ip"
            self.stats.refused[scope] += 1
            limit = self.admission.max_total if scope == "global" else self.admission.max_per_ip
            self.log.limited(
                "conn_limit", "Connection limit reached", kind=f"conn_limit:{scope}", limit=scope,
                max=limit,
                client=f"{ip}:{addr[1]}", listener=listener.name,
            )
            os.close(cfd)
            return
        os.set_blocking(cfd, False)
        conn = Conn(self, cfd, family, ip, addr[1], key, tracked, listener)
        self.conns.add(conn)
        self.stats.active += 1
        if listener.backend is not None and listener.mode == "tcp":
            conn.dial(listener.backend, b"")
        else:
            conn.start_hello()

    # --- backend addresses -------------------------------------------------------------------

    def resolve(
        self, backend: Backend, then: Callable[[], None]
    ) -> tuple[int, tuple[str, int]] | str | None:
        """(family, sockaddr), an error text, or None while a name is being resolved."""
        key = backend.addr
        hit = self._resolved.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        host = backend.host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            target: tuple[int, tuple[str, int]] = (fam, (host, backend.port))
            self._resolved[key] = (float("inf"), target)
            return target
        waiting = self._resolving.get(key)
        if waiting is not None:
            waiting.append(then)
            return None
        self._resolving[key] = [then]
        port = backend.port
        self.loop.run_in_thread(
            lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM),
            lambda infos, err: self._resolved_cb(key, host, port, infos, err),
        )
        return None

    def _resolved_cb(
        self, key: str, host: str, port: int, infos: AddrInfo | None, err: BaseException | None
    ) -> None:
        answer: tuple[int, tuple[str, int]] | str
        if err is None and infos:
            info = infos[0]
            answer = (int(info[0]), (str(info[4][0]), port))
            ttl = 30.0
        else:
            answer = f"cannot resolve {host}: {err or 'no address'}"
            ttl = 1.0
        self._resolved[key] = (time.monotonic() + ttl, answer)
        for cb in self._resolving.pop(key, []):
            cb()

    # --- idle and half-close sweep ----------------------------------------------------------

    def _sweep_interval(self) -> float:
        """A tenth of the shortest timeout the sweep enforces (so it is late by at most 10%),
        between 50 ms and 5 s. half_close_timeout is always set, so the sweep always runs."""
        shortest = self.cfg.half_close_timeout
        if 0 < self.cfg.idle_timeout < shortest:
            shortest = self.cfg.idle_timeout
        return min(5.0, max(0.05, shortest / 10))

    def _sweep(self) -> None:
        cfg = self.cfg
        idle = cfg.idle_timeout
        half = cfg.half_close_timeout
        now = self.loop.time()
        idle_expired: list[Conn] = []
        half_expired: list[Conn] = []
        polled: list[Conn] = []
        for conn in self.conns:
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
            up, down = conn.up, conn.down
            backend = conn.backend
            self.log.limited(
                "half_close_timeout", "half-closed connection timed out",
                finished="client" if up is not None and up.done else "backend",
                waiting_for="backend" if up is not None and up.done else "client",
                timeout=half, backend=backend.name if backend is not None else None,
                client=f"{conn.ip}:{conn.port}",
            )
            conn.close()
        self.loop.call_later(self._sweep_interval(), self._sweep)
