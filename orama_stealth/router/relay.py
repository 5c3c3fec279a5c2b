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
- Idle detection and byte counting are one integer per direction, bumped per read: the coarse
  periodic sweep folds it into the worker's counters and uses it to tell idle connections,
  never a timer reset per chunk.
- Sockets are bare descriptors watched by the worker's own epoll loop (`evloop.Loop`): an idle
  connection costs two dict entries there, no socket objects and no loop handles.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from orama_stealth.router.metrics import Stats

if TYPE_CHECKING:
    from orama_stealth.router.evloop import Loop
    from orama_stealth.router.worker import Conn

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
# Module globals: one lookup each on the per-read path instead of a global and an attribute.
_readv = os.readv
_write = os.write


def splice_available() -> bool:
    return _SPLICE


def _libc_shutdown() -> Callable[[int, int], int] | None:
    try:
        fn: Callable[[int, int], int] = ctypes.CDLL(None).shutdown
    except (OSError, AttributeError):
        return None
    return fn


_shutdown = _libc_shutdown()


def shutdown_wr(fd: int) -> None:
    """shutdown(SHUT_WR) on a bare descriptor. Relayed sockets are kept as ints, not socket
    objects (about 0.1 KiB each per idle connection), and Python has no shutdown for a bare
    descriptor: libc's is called directly (errors do not matter here: the peer may be gone).
    Borrowing a socket object instead costs a getsockname(2), which CPython uses to check the
    descriptor, on every connection."""
    if _shutdown is not None:
        _shutdown(fd, socket.SHUT_WR)
        return
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.detach()


def read_exact_size(fd: int) -> bytes:
    """One read into the shared buffer, returned as a right-sized bytes object (a 32 KiB recv
    buffer shrunk in place would leave heap holes behind every idle connection)."""
    n = os.readv(fd, _BUFS)
    return bytes(_MV[:n])


class Half:
    """One direction of a routed connection: bytes from `src` to `dst`.

    `rd`/`wr` mirror what is registered with the worker's loop, so nothing is registered or
    removed twice: every registration change is an epoll_ctl(2), and they add up per connection.
    """

    __slots__ = (
        "conn",
        "dfd",
        "done",
        "eof",
        "full",
        "inpipe",
        "moved",
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
        poller: Loop,
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
        self.moved = 0  # bytes read since the last fold()
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
            n = _readv(self.sfd, _BUFS)
        except _AGAIN:
            return
        except OSError:
            self.conn.close()
            return
        if not n:
            self._src_eof()
            return
        self.moved += n
        try:
            sent = _write(self.dfd, _MV[:n])
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
        if n < LARGE_READ:
            if self.full:
                self.full = 0
            if self.poller.hup:
                # The peer's FIN was reported with these bytes and the read did not fill the
                # buffer, so nothing is left before it: finish now instead of reading again
                # just to get 0 (what HAProxy does with EPOLLRDHUP, too).
                self._src_eof()
        else:
            self.full += 1
            if self.full >= BULK_READS and _SPLICE:
                self._to_splice()

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
        self.eof = True
        self.rd = False
        flushed = not self.pending and not self.inpipe
        if not (flushed and self.conn.other_done(self)):
            # Otherwise both directions are over and the connection closes in _finish below:
            # close(2) takes the descriptor out of the epoll set, no epoll_ctl is spent on it.
            self.poller.remove_reader(self.sfd)
        if flushed:
            self._finish()

    def _finish(self) -> None:
        self.done = True
        # When the other direction already finished, close(2) follows at once and sends the
        # FIN itself (nothing is left unread on dst: its own EOF was read).
        if not self.conn.other_done(self):
            shutdown_wr(self.dfd)
        self.conn.half_done()

    def poll(self) -> None:
        """Read now as if the loop had reported the source readable (EAGAIN when it is not).

        A safety net for half-closed connections that went quiet: should a wakeup for the
        remaining direction ever be missed (it was, under uvloop, which ran the relay before
        evloop), the backend's close is still seen by the next sweep rather than at
        drain_timeout. It costs one read per such connection per sweep.
        """
        if self.rd and not self.done:
            self.poller.hup = 0  # not called from the loop: no FIN was reported with it
            if self.pipe_r >= 0:
                self.on_splice_readable()
            else:
                self.on_readable()

    def fold(self) -> int:
        """Add the bytes read since the last fold to the worker's counters; return them (0:
        this direction was idle since)."""
        n = self.moved
        if n:
            self.moved = 0
            if self.upward:
                self.stats.bytes_up += n
            else:
                self.stats.bytes_down += n
        return n

    def release(self) -> None:
        """Release the pipe; the connection closes (and so unregisters) the sockets."""
        self.fold()
        self.rd = self.wr = False
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
        self.moved += n
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
