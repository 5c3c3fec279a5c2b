"""The listening sockets: binding (dual-stack, one SO_REUSEPORT socket per worker), sockets
inherited from systemd, TCP_DEFER_ACCEPT, and who owns which socket.

The supervisor owns every listening socket for the router's whole life (`ListenerSet`); each
worker gets its own socket of each listener (or the one shared socket systemd passed) and closes
the others after the fork. A worker that restarts finds its socket where it left it, with the
connections that arrived meanwhile waiting in its queue.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from orama_stealth.router.config import Listener, RouterConfig
from orama_stealth.router.logs import Logger

BACKLOG = 4096


class BindError(Exception):
    pass


def bind(listener: Listener, reuseport: bool = False) -> socket.socket:
    """Dual-stack for ":port" (IPv4 arrives as ::ffff:a.b.c.d), plain IPv4 where v6 is absent."""
    host, port = listener.host, listener.port
    candidates: list[tuple[int, tuple[str, int]]] = []
    if host == "":
        candidates = [(socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as e:
            raise BindError(f"listener {listener.name}: cannot resolve {host!r}: {e}") from None
        candidates = [(int(i[0]), (str(i[4][0]), port)) for i in infos[:1]]
    last: OSError | None = None
    for family, addr in candidates:
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and host == "":
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(addr)
            s.listen(BACKLOG)
            s.setblocking(False)
            return s
        except OSError as e:
            s.close()
            last = e
            # Only a missing IPv6 stack falls back to IPv4; a busy port is an error.
            if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                break
    raise BindError(f"listener {listener.name}: cannot listen on {listener.addr}: {last}")


def defer_accept(sock: socket.socket, listener: Listener, seconds: float) -> None:
    """TLS clients speak first: let the kernel hand over a connection only once its hello (or
    any byte) arrived. The worker then reads the hello right after accept without registering
    with the loop or arming a timer, and connections that never speak cost nothing. Not for
    `mode: tcp` listeners, whose protocol may have the server speak first."""
    if listener.mode != "tls" or not hasattr(socket, "TCP_DEFER_ACCEPT"):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, max(1, int(seconds + 0.999)))


def sockname(sock: socket.socket) -> str:
    try:
        addr = sock.getsockname()
    except OSError:
        return "?"
    return f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"


@dataclass
class OpenListener:
    """One configured listener and its sockets: one per worker when bound here, else one."""

    listener: Listener
    sockets: list[socket.socket]
    how: str  # bound | inherited

    def for_worker(self, index: int) -> socket.socket:
        return self.sockets[index % len(self.sockets)]


class ListenerSet:
    """Every listening socket the router holds, by listener, in the config's order."""

    def __init__(self, items: list[OpenListener]) -> None:
        self.items = items

    def __iter__(self) -> Iterator[OpenListener]:
        return iter(self.items)

    def for_worker(self, index: int) -> list[tuple[Listener, socket.socket]]:
        """Worker `index`'s own socket of each listener (the shared one when there is one)."""
        return [(o.listener, o.for_worker(index)) for o in self.items]

    def keep_only(self, index: int) -> None:
        """In a worker after the fork: close every socket that is not its own. A copy of
        another worker's socket left open would keep that worker's accept queue alive after it
        drained, and connections would wait in it for nobody."""
        mine = {id(s) for _li, s in self.for_worker(index)}
        for o in self.items:
            for s in o.sockets:
                if id(s) not in mine:
                    s.close()

    def close(self) -> None:
        for o in self.items:
            for s in o.sockets:
                s.close()

    def describe(self) -> str:
        return ",".join(f"{o.listener.name}={sockname(o.sockets[0])}" for o in self.items)


def open_listeners(
    cfg: RouterConfig, inherited: list[tuple[str, socket.socket]], log: Logger, workers: int = 1
) -> ListenerSet:
    """Sockets per listener: one per worker when we bind, one shared when systemd passed it.

    Binding one SO_REUSEPORT socket per worker lets the kernel hand each new connection to
    exactly one worker; a single shared socket wakes every worker for every connection (only
    one wins the accept). Sockets from systemd are matched to listeners by name, else by order.
    """
    by_name = {name: s for name, s in inherited if name}
    known = {li.name for li in cfg.listeners}
    unnamed = [s for name, s in inherited if not name or name not in known]
    out = ListenerSet([])
    try:
        for i, li in enumerate(cfg.listeners):
            sock = by_name.pop(li.name, None)
            if sock is None and unnamed and i < len(inherited):
                sock = unnamed.pop(0)
            if sock is not None:
                sock.setblocking(False)
                opened = OpenListener(li, [sock], "inherited")
                out.items.append(opened)
            else:
                opened = OpenListener(li, [], "bound")
                out.items.append(opened)  # so a failure below closes what was bound
                for _ in range(workers if workers > 1 else 1):
                    opened.sockets.append(bind(li, reuseport=workers > 1))
            for s in opened.sockets:
                defer_accept(s, li, cfg.client_hello_timeout)
            log.info(
                "listening", "listener open", listener=li.name, addr=li.addr, mode=li.mode,
                socket=sockname(opened.sockets[0]), how=opened.how, sockets=len(opened.sockets),
            )
    except BaseException:
        out.close()
        raise
    for s in [*by_name.values(), *unnamed]:
        log.warn("listen_fd_unused", "inherited socket matches no listener", socket=sockname(s))
        s.close()
    return out
