"""Pumping ciphertext between a client and its backend: one `Half` per direction.

Why it looks like this (figures in docs/router.md):
- No coroutine, no StreamReader, no transport per connection: the loop calls `on_readable` when
  the source socket has bytes; it `recv_into`s one buffer shared by the whole worker and `send`s
  straight on. An idle connection therefore holds no buffer at all.
- Flow control is structural: when the destination does not take everything, the remainder (at
  most one read) is kept, reading from the source stops and a writer callback waits for the
  destination; reading resumes only once it is flushed.
- Half-close: EOF from one side becomes shutdown(SHUT_WR) on the other once everything before it
  was delivered; the connection closes when both directions are done.
- Bulk: after a few reads that filled the whole buffer, the direction switches to splice(2)
  through a pipe, so the kernel moves the bytes without copying them through Python.
- Idle detection is a flag set per read and checked by a coarse periodic sweep, never a timer
  reset per chunk.
- Relayed sockets are watched by one worker-wide epoll (`Poller`), itself a single reader of the
  loop: uvloop keeps a poll handle and a callback handle per watched descriptor (about 0.6 KiB
  each, two per idle connection), the Poller only a dict entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from orama_stealth.metrics import Stats

if TYPE_CHECKING:
    from orama_stealth.worker import Conn

BUFSIZE = 1 << 16
# A direction counts as bulk, and moves to splice(2), after this many large reads in a row; a
# read is large when it holds at least a full TLS record (16 KiB of payload plus framing), which
# interactive traffic (TURN, keep-alive HTTP) rarely produces.
BULK_READS = 8
LARGE_READ = 16 * 1024
# A bigger pipe moves more per splice pair (fewer syscalls per GB); only bulk directions get one.
PIPE_SIZE = 1 << 18
_BUF = bytearray(BUFSIZE)
_MV = memoryview(_BUF)
_BUFS = [_BUF]
_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = (
    getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2) if _SPLICE else 0
)
_AGAIN = (BlockingIOError, InterruptedError)
# Events handed out per wakeup; more stay pending (level-triggered) for the next loop iteration,
# so one busy worker still lets the loop run its other callbacks.
MAX_EVENTS = 256
_IN = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_OUT = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


class Poller:
    """Readiness callbacks for relayed sockets, with the add/remove_reader/writer surface of the
    loop, dispatched from one level-triggered epoll that the loop watches as a single reader."""

    __slots__ = ("ep", "loop", "readers", "writers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ep = select.epoll()
        self.loop = loop
        self.readers: dict[int, Callable[[], None]] = {}
        self.writers: dict[int, Callable[[], None]] = {}
        loop.add_reader(self.ep.fileno(), self._dispatch)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.ep.fileno())
        self.ep.close()
        self.readers.clear()
        self.writers.clear()

    def _mask(self, fd: int) -> int:
        return (select.EPOLLIN if fd in self.readers else 0) | (
            select.EPOLLOUT if fd in self.writers else 0
        )

    def _apply(self, fd: int, old: int) -> None:
        new = self._mask(fd)
        if new == old:
            return
        if not new:
            with contextlib.suppress(OSError):
                self.ep.unregister(fd)
        elif not old:
            try:
                self.ep.register(fd, new)
            except FileExistsError:
                self.ep.modify(fd, new)
        else:
            try:
                self.ep.modify(fd, new)
            except FileNotFoundError:
                self.ep.register(fd, new)

    def add_reader(self, fd: int, cb: Callable[[], None]) -> None:
        old = self._mask(fd)
        self.readers[fd] = cb
        self._apply(fd, old)

    def remove_reader(self, fd: int) -> None:
        old = self._mask(fd)
        self.readers.pop(fd, None)
        self._apply(fd, old)

    def add_writer(self, fd: int, cb: Callable[[], None]) -> None:
        old = self._mask(fd)
        self.writers[fd] = cb
        self._apply(fd, old)

    def remove_writer(self, fd: int) -> None:
        old = self._mask(fd)
        self.writers.pop(fd, None)
        self._apply(fd, old)

    def _dispatch(self) -> None:
        try:
            events = self.ep.poll(0, MAX_EVENTS)
        except InterruptedError:
            return
        for fd, ev in events:
            # A callback may close its connection and so unregister fds later in this batch:
            # look each one up at the moment it is dispatched.
            if ev & _IN:
                cb = self.readers.get(fd)
                if cb is not None:
                    self._run(cb)
            if ev & _OUT:
                cb = self.writers.get(fd)
                if cb is not None:
                    self._run(cb)

    def _run(self, cb: Callable[[], None]) -> None:
        try:
            cb()
        except Exception as e:  # like a loop callback: report it, keep serving the others
            self.loop.call_exception_handler(
                {"message": "Exception in relay callback", "exception": e}
            )


def splice_available() -> bool:
    return _SPLICE


def shutdown_wr(fd: int) -> None:
    """shutdown(SHUT_WR) on a bare descriptor: relayed sockets are kept as ints, not socket
    objects (about 0.1 KiB each per idle connection), so a socket object is borrowed for the
    call and detached so that dropping it does not close the descriptor."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.detach()


def recv_exact_size(sock: socket.socket) -> bytes:
    """One recv into the shared buffer, returned as a right-sized bytes object (a 32 KiB recv
    buffer shrunk in place would leave heap holes behind every idle connection)."""
    n = sock.recv_into(_BUF)
    return bytes(_MV[:n])


class Half:
    """One direction of a routed connection: bytes from `src` to `dst`.

    `rd`/`wr` mirror what is registered with the worker's Poller, so nothing is registered or
    removed twice: every registration change is an epoll_ctl(2), and they add up per connection.
    """

    __slots__ = (
        "active",
        "conn",
        "dfd",
        "done",
        "eof",
        "full",
        "inpipe",
        "pending",
        "pipe_r",
        "pipe_size",
        "pipe_w",
        "poller",
        "rd",
        "sfd",
        "stats",
        "upward",
        "wr",
    )

    def __init__(
        self,
        conn: Conn,
        sfd: int,
        dfd: int,
        upward: bool,
        poller: Poller,
        stats: Stats,
    ) -> None:
        self.conn = conn
        self.sfd = sfd
        self.dfd = dfd
        self.upward = upward
        self.poller = poller
        self.stats = stats
        self.pending: bytes | bytearray = b""
        self.eof = False
        self.done = False
        self.full = 0
        self.active = True
        self.rd = False
        self.wr = False
        self.pipe_r = -1
        self.pipe_w = -1
        self.pipe_size = BUFSIZE
        self.inpipe = 0

    # --- start -------------------------------------------------------------------------------

    def start(self, first: bytes = b"") -> None:
        """Begin pumping, after sending `first` (PROXY header and replayed hello) to `dst`."""
        if first:
            try:
                sent = os.write(self.dfd, first)
            except _AGAIN:
                sent = 0
            except OSError:
                self.conn.close()
                return
            if sent < len(first):
                self.pending = first[sent:]
                self.wr = True
                self.poller.add_writer(self.dfd, self.on_writable)
                return
        self.rd = True
        self.poller.add_reader(self.sfd, self.on_readable)

    # --- copying through Python --------------------------------------------------------------

    def on_readable(self) -> None:
        try:
            n = os.readv(self.sfd, _BUFS)
        except _AGAIN:
            return
        except OSError:
            self.conn.close()
            return
        if n == 0:
            self._src_eof()
            return
        self.active = True
        if self.upward:
            self.stats.bytes_up += n
        else:
            self.stats.bytes_down += n
        try:
            sent = os.write(self.dfd, _MV[:n])
        except _AGAIN:
            sent = 0
        except OSError:
            self.conn.close()
            return
        if sent < n:
            self.pending = _BUF[sent:n]
            self.rd = False
            self.poller.remove_reader(self.sfd)
            self.wr = True
            self.poller.add_writer(self.dfd, self.on_writable)
            return
        if n >= LARGE_READ:
            self.full += 1
            if self.full >= BULK_READS and _SPLICE:
                self._to_splice()
        else:
            self.full = 0

    def on_writable(self) -> None:
        try:
            sent = os.write(self.dfd, self.pending)
        except _AGAIN:
            return
        except OSError:
            self.conn.close()
            return
        if sent < len(self.pending):
            self.pending = self.pending[sent:]
            return
        self.pending = b""
        self.wr = False
        self.poller.remove_writer(self.dfd)
        if self.eof:
            self._finish()
        else:
            self.rd = True
            self.poller.add_reader(self.sfd, self.on_readable)

    # --- end of one direction ----------------------------------------------------------------

    def _src_eof(self) -> None:
        self.rd = False
        self.poller.remove_reader(self.sfd)
        self.eof = True
        if not self.pending and not self.inpipe:
            self._finish()

    def _finish(self) -> None:
        self.done = True
        shutdown_wr(self.dfd)
        self.conn.half_done()

    def poll(self) -> None:
        """Read now as if the loop had reported the source readable (EAGAIN when it is not).

        Under uvloop the remaining direction of a half-closed connection sometimes stops being
        reported: traced, its descriptor leaves the epoll set right after the other direction's
        EOF, so a backend's close (coturn after a TURN probe) is never seen and the connection
        outlives both peers until drain_timeout. The sweep calls this for half-closed
        connections that went quiet, which costs one recv per such connection per sweep.
        """
        if self.rd and not self.done:
            if self.pipe_r >= 0:
                self.on_splice_readable()
            else:
                self.on_readable()

    def stop(self) -> None:
        """Unregister callbacks and release the pipe; the sockets belong to the connection."""
        if self.rd:
            self.rd = False
            self.poller.remove_reader(self.sfd)
        if self.wr:
            self.wr = False
            self.poller.remove_writer(self.dfd)
        if self.pipe_r >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1
        self.pending = b""

    # --- bulk: splice(2) through a pipe ------------------------------------------------------

    def _to_splice(self) -> None:
        try:
            self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # out of descriptors: keep copying, it still works
        try:
            self.pipe_size = fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            # Over the per-user pipe budget (fs.pipe-user-pages-soft) the kernel hands out
            # one-page pipes: 4 KiB per splice pair costs more than copying 64 KiB reads.
            self.pipe_size = fcntl.fcntl(self.pipe_w, fcntl.F_GETPIPE_SZ)
            if self.pipe_size < BUFSIZE:
                os.close(self.pipe_r)
                os.close(self.pipe_w)
                self.pipe_r = self.pipe_w = -1
                self.pipe_size = BUFSIZE
                self.full = 0
                self.stats.splice_refused += 1
                return
        self.stats.splice_switches += 1
        # Re-registering an fd that is already watched only swaps the callback.
        self.poller.add_reader(self.sfd, self.on_splice_readable)

    def on_splice_readable(self) -> None:
        try:
            n = os.splice(self.sfd, self.pipe_w, self.pipe_size, flags=_SPLICE_FLAGS)
        except _AGAIN:
            return
        except OSError:
            self.conn.close()
            return
        if n == 0:
            self._src_eof()
            return
        self.active = True
        if self.upward:
            self.stats.bytes_up += n
        else:
            self.stats.bytes_down += n
        self.inpipe = n
        if self._drain_pipe() and self.inpipe:
            self.rd = False
            self.poller.remove_reader(self.sfd)
            self.wr = True
            self.poller.add_writer(self.dfd, self.on_splice_writable)

    def _drain_pipe(self) -> bool:
        """Move what the pipe holds to dst; False when the connection was closed."""
        while self.inpipe:
            try:
                m = os.splice(self.pipe_r, self.dfd, self.inpipe, flags=_SPLICE_FLAGS)
            except _AGAIN:
                return True
            except OSError:
                self.conn.close()
                return False
            self.inpipe -= m
        return True

    def on_splice_writable(self) -> None:
        if not self._drain_pipe() or self.inpipe:
            return
        self.wr = False
        self.poller.remove_writer(self.dfd)
        if self.eof:
            self._finish()
        else:
            self.rd = True
            self.poller.add_reader(self.sfd, self.on_splice_readable)
