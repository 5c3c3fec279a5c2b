"""The floor: what a relay written in Python costs on this machine with the router's technique.

Not a product, and not something to run in front of anything real: no ClientHello, no routing,
no limits, no timeouts, no logging, no counters, and every connection goes to one backend. It
moves bytes the way orama-sni-router does: small reads copied through one buffer per process,
a direction that keeps filling the buffer switched to splice(2) through a 256 KiB pipe,
EPOLLRDHUP to end a direction without the read that returns 0, half-close passed on with
shutdown(SHUT_WR), TCP_DEFER_ACCEPT, one process per CPU on its own SO_REUSEPORT socket, one
level-triggered epoll. Measured beside the router in every bench run, it tells how much of the
router's cost is the technique and the language, and how much is everything the router does on
top of them.

    python3 -m bench.floor --listen 127.0.0.1:8443 --backend 127.0.0.1:9443 [--workers N]
"""

from __future__ import annotations

import _socket
import argparse
import contextlib
import ctypes
import fcntl
import os
import select
import signal
import socket
import sys

BUFSIZE = 1 << 16
LARGE_READ = 16 * 1024
BULK_READS = 8
PIPE_SIZE = 1 << 18
_SPLICE_FLAGS = 1 | 2  # SPLICE_F_MOVE | SPLICE_F_NONBLOCK
_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT
_READY_IN = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_READY_OUT = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_AGAIN = (BlockingIOError, InterruptedError)
# shutdown(2) on a bare descriptor, as the router does it: a socket object would cost a dup.
_shutdown = ctypes.CDLL(None).shutdown


class Direction:
    """Bytes from `src` to `dst`; `peer` is the other direction of the same connection."""

    __slots__ = ("done", "dst", "eof", "full", "inpipe", "peer", "pending", "pipe_r", "pipe_w",
                 "src")

    def __init__(self, src: int, dst: int) -> None:
        self.src, self.dst = src, dst
        self.peer: Direction | None = None
        self.pending = b""
        self.full = 0
        self.pipe_r = self.pipe_w = -1
        self.inpipe = 0
        self.eof = self.done = False


class Relay:
    def __init__(self, lsock: socket.socket, backend: tuple[str, int]) -> None:
        self.lsock = lsock
        self.backend = backend
        self.ep = select.epoll()
        self.readers: dict[int, Direction] = {}
        self.writers: dict[int, Direction] = {}
        self.masks: dict[int, int] = {}
        self.buf = bytearray(BUFSIZE)
        self.view = memoryview(self.buf)
        self.bufs = [self.buf]  # readv's list, built once as the router's is

    def _watch(self, fd: int, add: int, drop: int) -> None:
        old = self.masks.get(fd, 0)
        new = (old | add) & ~drop
        if new == old:
            return
        if not new:
            # Unregistered, not left with an empty mask: epoll reports EPOLLHUP and EPOLLERR
            # whatever the mask, and a socket nobody reads would report them in a loop.
            del self.masks[fd]
            self.ep.unregister(fd)
            return
        self.masks[fd] = new
        if old:
            self.ep.modify(fd, new)
        else:
            self.ep.register(fd, new)

    def run(self) -> None:
        lfd = self.lsock.fileno()
        self.ep.register(lfd, select.EPOLLIN)
        readers, writers = self.readers, self.writers
        while True:
            try:
                events = self.ep.poll()
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == lfd:
                    self._accept()
                    continue
                if ev & _READY_IN:
                    d = readers.get(fd)
                    if d is not None:
                        self._read(d, ev & select.EPOLLRDHUP)
                if ev & _READY_OUT:
                    d = writers.get(fd)
                    if d is not None:
                        self._write(d)

    def _accept(self) -> None:
        try:
            # The bare descriptor, as the router takes it: a socket object costs a getsockname.
            cfd, _addr = self.lsock._accept()  # type: ignore[attr-defined]
        except _AGAIN:
            return
        os.set_blocking(cfd, False)
        server = _socket.socket(self.lsock.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Not waited for: bytes for the backend wait in the direction's pending buffer until
        # the connect completes (the socket turns writable), and a refusal shows up as the
        # first write's or read's error, which closes the pair.
        server.connect_ex(self.backend)
        sfd = server.detach()
        up, down = Direction(cfd, sfd), Direction(sfd, cfd)
        up.peer, down.peer = down, up
        for d in (up, down):
            self.readers[d.src] = d
            self._watch(d.src, _IN, 0)

    def _read(self, d: Direction, hup: int) -> None:
        if d.pipe_r >= 0:
            self._splice_in(d)
            return
        try:
            n = os.readv(d.src, self.bufs)
        except _AGAIN:
            return
        except OSError:
            self._close(d)
            return
        if not n:
            self._eof(d)
            return
        try:
            sent = os.write(d.dst, self.view[:n])
        except _AGAIN:
            sent = 0
        except OSError:
            self._close(d)
            return
        if sent < n:
            d.pending = bytes(self.buf[sent:n])
            self._block(d)
            return
        if n < LARGE_READ:
            d.full = 0
            if hup:
                self._eof(d)
            return
        d.full += 1
        if d.full >= BULK_READS:
            d.pipe_r, d.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            fcntl.fcntl(d.pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)

    def _splice_in(self, d: Direction) -> None:
        try:
            n = os.splice(d.src, d.pipe_w, PIPE_SIZE, flags=_SPLICE_FLAGS)
        except _AGAIN:
            return
        except OSError:
            self._close(d)
            return
        if not n:
            self._eof(d)
            return
        d.inpipe = n
        if self._drain_pipe(d) and d.inpipe:
            self._block(d)

    def _drain_pipe(self, d: Direction) -> bool:
        while d.inpipe:
            try:
                d.inpipe -= os.splice(d.pipe_r, d.dst, d.inpipe, flags=_SPLICE_FLAGS)
            except _AGAIN:
                return True
            except OSError:
                self._close(d)
                return False
        return True

    def _block(self, d: Direction) -> None:
        """dst is full: stop reading src until dst has taken what is held."""
        self.readers.pop(d.src, None)
        self._watch(d.src, 0, _IN)
        self.writers[d.dst] = d
        self._watch(d.dst, _OUT, 0)

    def _write(self, d: Direction) -> None:
        if d.inpipe:
            if not self._drain_pipe(d) or d.inpipe:
                return
        elif d.pending:
            try:
                sent = os.write(d.dst, d.pending)
            except _AGAIN:
                return
            except OSError:
                self._close(d)
                return
            d.pending = d.pending[sent:]
            if d.pending:
                return
        self.writers.pop(d.dst, None)
        self._watch(d.dst, 0, _OUT)
        if d.eof:
            self._finish(d)
        else:
            self.readers[d.src] = d
            self._watch(d.src, _IN, 0)

    def _eof(self, d: Direction) -> None:
        d.eof = True
        self.readers.pop(d.src, None)
        self._watch(d.src, 0, _IN)
        if not d.pending and not d.inpipe:
            self._finish(d)

    def _finish(self, d: Direction) -> None:
        d.done = True
        peer = d.peer
        assert peer is not None
        if peer.done:
            self._close(d)
            return
        _shutdown(d.dst, socket.SHUT_WR)  # the peer may be gone already: that is fine

    def _close(self, d: Direction) -> None:
        peer = d.peer
        assert peer is not None
        for x in (d, peer):
            if x.pipe_r >= 0:
                os.close(x.pipe_r)
                os.close(x.pipe_w)
                x.pipe_r = x.pipe_w = -1
            if x.src >= 0:
                # Writers are keyed by their destination, which is the other direction's src.
                self.readers.pop(x.src, None)
                self.writers.pop(x.src, None)
                self.masks.pop(x.src, None)
                with contextlib.suppress(OSError):
                    os.close(x.src)  # close(2) also takes it out of the epoll set
                x.src = -1
            x.done = True


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _bind(addr: tuple[str, int], reuseport: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(addr)
    # Accepted sockets inherit it: one setsockopt here instead of one per connection.
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # As the router's TLS listeners: a connection is handed over once its first bytes are in.
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
    s.listen(1024)
    s.setblocking(False)
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", type=_addr, required=True)
    p.add_argument("--backend", type=_addr, required=True)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    n = max(1, a.workers)
    socks = [_bind(a.listen, n > 1) for _ in range(n)]
    children: list[int] = []
    for s in socks:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            for other in socks:
                if other is not s:
                    other.close()
            Relay(s, a.backend).run()
            os._exit(0)
        children.append(pid)
    for s in socks:
        s.close()

    def stop(_sig: int, _frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"floor listening on {a.listen[0]}:{a.listen[1]} workers={n}", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
