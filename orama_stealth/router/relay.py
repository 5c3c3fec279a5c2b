"""The data path: pumping ciphertext between a client and its backend, one `Half` per direction,
all of a worker's routed sockets in one epoll (`Relay`) that the asyncio loop watches as a
single reader.

Why it looks like this (figures in docs/router.md and docs/performance.md):
- No coroutine, no transport per connection: when the relay's epoll reports a source socket
  readable, its `Half` reads into one buffer shared by the whole worker and writes straight on.
  An idle connection holds no buffer, no loop handle and no socket object: two bare descriptors,
  two `Half`s and one entry per descriptor here.
- Flow control is structural: when the destination does not take everything, the remainder (at
  most one read) is kept, reading from the source stops and the destination is watched for
  writability; reading resumes only once it is flushed.
- Half-close: EOF from one side becomes shutdown(SHUT_WR) on the other once everything before it
  was delivered; the connection closes when both directions are done. Readers are watched with
  EPOLLRDHUP, so a short read that came with the peer's FIN finishes the direction at once.
- A source stays in the epoll set while its reading is paused (EPOLLERR only), so a peer that
  resets is noticed in every state, not at the idle sweep.
- Bulk: after a few reads that filled a TLS record, a direction switches to splice(2) through a
  pipe, so the kernel moves the bytes without copying them through Python.
- Idle detection and byte counting are one integer per direction, bumped per read and folded by
  the worker's periodic sweep: no timer per connection, none reset per chunk.

This module knows nothing of connections: a `Half` reports to its `Owner` (the connection).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import socket
from collections.abc import Callable
from typing import Protocol

from orama_stealth.router.metrics import Stats

BUFSIZE = 1 << 16
# A direction counts as bulk, and moves to splice(2), after this many large reads in a row; a
# read is large when it holds at least a full TLS record (16 KiB of payload plus framing), which
# interactive traffic (TURN, keep-alive HTTP) rarely produces.
BULK_READS = 8
LARGE_READ = 16 * 1024
# A bigger pipe moves more per splice pair (fewer syscalls per GB); only bulk directions get one.
PIPE_SIZE = 1 << 18
# Events handled per wakeup; more stay pending (level-triggered) for the next one, so the loop's
# timers and accepts still run while every connection is busy.
MAX_EVENTS = 256
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
RD = select.EPOLLIN | select.EPOLLRDHUP  # what a reading Half watches on its source
WR = select.EPOLLOUT  # what a Half waiting to flush watches on its destination
# What a source stays registered with while neither is wanted (its reading paused behind a
# full destination, or its EOF read): epoll reports an error (the peer's reset) whatever the
# mask, so a paused socket whose peer left is still noticed at once instead of at idle_timeout.
WATCH = select.EPOLLERR
_IN = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_OUT = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_GONE = select.EPOLLHUP | select.EPOLLERR
_RDHUP = select.EPOLLRDHUP
_WANTED = RD | WR


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
    n = _readv(fd, _BUFS)
    return bytes(_MV[:n])


class Owner(Protocol):
    """What a Half reports to: the connection it belongs to."""

    def close(self) -> None: ...

    def half_done(self) -> None: ...


class Relay:
    """One epoll for every routed socket of a worker; the asyncio loop watches its descriptor.

    Each socket is registered once, by the Half that reads from it; that Half's `mask` holds
    what is watched on it: RD while it reads, WR while its peer (the Half writing to the same
    socket) waits to flush, and WATCH when it wants neither, so the socket stays in the set and
    its peer's reset is reported in every state. A socket about to be closed is only forgotten:
    close(2) takes it out of the epoll set, no epoll_ctl is spent on it.
    """

    __slots__ = ("_ep", "halves", "hup", "on_error", "stats", "watched")

    def __init__(self, stats: Stats, on_error: Callable[[BaseException, object], None]) -> None:
        self._ep = select.epoll()
        self.stats = stats
        self.on_error = on_error
        self.halves: dict[int, Half] = {}  # by the descriptor each one reads from
        # Client sockets of connections still dialing their backend, watched for a reset only
        # (see watch); a pair() made for one takes its registration over.
        self.watched: dict[int, Callable[[], None]] = {}
        # While a Half's read runs: non-zero when epoll also reported the peer's FIN
        # (EPOLLRDHUP). Everything the peer sent before it is then already queued, so a read
        # that returns less than it asked for has reached the end.
        self.hup = 0

    def fileno(self) -> int:
        return self._ep.fileno()

    def close(self) -> None:
        self._ep.close()
        self.halves.clear()

    def watch(self, fd: int, on_reset: Callable[[], None]) -> None:
        """Report an error (the peer's reset) on `fd` before it is relayed: for a client
        waiting while its backend is dialed. Bytes it sends meanwhile wake nothing, they wait
        for the relay; neither does a FIN, which the relay passes on like any other."""
        self.watched[fd] = on_reset
        self._ep.register(fd, WATCH)

    def unwatch(self, fd: int) -> None:
        """Forget a watched descriptor that is about to be closed (close(2) unregisters it)."""
        self.watched.pop(fd, None)

    def pair(self, owner: Owner, cfd: int, bfd: int) -> tuple[Half, Half]:
        """The two directions of a connection: client -> backend (up), backend -> client."""
        up = Half(owner, self, cfd, bfd, True)
        down = Half(owner, self, bfd, cfd, False)
        if self.watched.pop(cfd, None) is not None:
            up.mask = WATCH  # already in the epoll set: the first _set modifies
        up.peer = down
        down.peer = up
        self.halves[cfd] = up
        self.halves[bfd] = down
        return up, down

    def _set(self, half: Half, mask: int) -> None:
        mask &= _WANTED
        if not mask:
            # Still watched for the peer's reset, unless epoll already reported a hang-up
            # (both directions shut) with nothing to do yet: level-triggered, that would be
            # reported again on every wakeup.
            mask = 0 if half.hung_up else WATCH
        old = half.mask
        if mask == old:
            return
        half.mask = mask
        if not mask:
            self._ep.unregister(half.sfd)
        elif not old:
            self._ep.register(half.sfd, mask)
        else:
            self._ep.modify(half.sfd, mask)

    def forget(self, half: Half) -> None:
        if self.halves.get(half.sfd) is half:
            del self.halves[half.sfd]
        half.mask = 0

    def on_ready(self) -> None:
        """The loop's reader callback: handle what the relay's epoll has ready, now."""
        try:
            events = self._ep.poll(0, MAX_EVENTS)
        except InterruptedError:
            return
        halves = self.halves
        in_, out, rdhup = _IN, _OUT, _RDHUP  # locals: this runs once per event
        for fd, ev in events:
            # Looked up in turn: an earlier event of this batch may have closed a connection.
            half = halves.get(fd)
            if half is None:
                gone = self.watched.get(fd)
                if gone is not None:
                    gone()
                continue
            try:
                mask = half.mask
                if ev & in_ and mask & RD:
                    self.hup = ev & rdhup
                    if half.pipe_r >= 0:
                        half.on_splice_readable()
                    else:
                        half.on_readable()
                if ev & out and mask & WR:
                    peer = half.peer
                    if peer.pipe_r >= 0:
                        peer.on_splice_writable()
                    else:
                        peer.on_writable()
                if ev & _GONE and not mask & _WANTED:
                    half.on_gone(ev)
            except Exception as e:  # one connection's bug must not take the others down
                self.on_error(e, half)


class Half:
    """One direction of a routed connection: bytes from `sfd` to `dfd`."""

    __slots__ = (
        "dfd",
        "done",
        "eof",
        "full",
        "hung_up",
        "inpipe",
        "mask",
        "moved",
        "owner",
        "peer",
        "pending",
        "pipe_r",
        "pipe_size",
        "pipe_w",
        "relay",
        "sfd",
        "upward",
    )

    def __init__(self, owner: Owner, relay: Relay, sfd: int, dfd: int, upward: bool) -> None:
        self.owner = owner
        self.relay = relay
        self.peer: Half = self
        self.sfd = sfd
        self.dfd = dfd
        self.upward = upward
        self.mask = 0  # what the relay's epoll watches on sfd (see Relay)
        self.pending: bytes | bytearray = b""
        self.eof = False
        self.done = False
        self.full = 0
        self.hung_up = False  # epoll reported EPOLLHUP while nothing was wanted (see on_gone)
        self.moved = 0  # bytes read since the last fold()
        self.pipe_r = -1
        self.pipe_w = -1
        self.pipe_size = BUFSIZE
        self.inpipe = 0

    # --- what is watched -------------------------------------------------------------------

    @property
    def reading(self) -> bool:
        return bool(self.mask & RD)

    def _read_on(self) -> None:
        self.relay._set(self, self.mask | RD)

    def _read_off(self) -> None:
        self.relay._set(self, self.mask & ~RD)

    def _write_on(self) -> None:
        # dfd is the peer's source: its registration carries this direction's WR.
        peer = self.peer
        self.relay._set(peer, peer.mask | WR)

    def _write_off(self) -> None:
        peer = self.peer
        self.relay._set(peer, peer.mask & ~WR)

    # --- start -------------------------------------------------------------------------------

    def start(self, first: bytes = b"") -> None:
        """Begin pumping, after sending `first` (PROXY header and replayed hello) to `dst`."""
        if first:
            try:
                sent = _write(self.dfd, first)
            except _AGAIN:
                sent = 0
            except OSError:
                self.owner.close()
                return
            if sent < len(first):
                self.pending = first[sent:]
                self._write_on()
                return
        self._read_on()

    # --- copying through Python --------------------------------------------------------------

    def on_readable(self) -> None:
        try:
            n = _readv(self.sfd, _BUFS)
        except _AGAIN:
            return
        except OSError:
            self.owner.close()
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
            self.owner.close()
            return
        if sent < n:
            self.pending = _BUF[sent:n]
            self._read_off()
            self._write_on()
            return
        if n < LARGE_READ:
            if self.full:
                self.full = 0
            if self.relay.hup:
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
            sent = _write(self.dfd, self.pending)
        except _AGAIN:
            return
        except OSError:
            self.owner.close()
            return
        if sent < len(self.pending):
            self.pending = self.pending[sent:]
            return
        self.pending = b""
        self._write_off()
        if self.eof:
            self._finish()
        else:
            self._read_on()

    # --- end of one direction ----------------------------------------------------------------

    def on_gone(self, ev: int) -> None:
        """epoll reported an error or hang-up on the source while this Half neither reads it
        nor waits to write to it (paused behind a full destination, or past its EOF)."""
        if ev & select.EPOLLERR:
            # The peer reset: nothing more can be delivered to it and what it sent is void.
            self.owner.close()
            return
        # A plain hang-up: both directions of this socket are shut (its FIN arrived and ours
        # was sent), with bytes maybe still unread behind a paused read. Stop watching until
        # reading resumes, which finds them and the EOF.
        self.hung_up = True
        self.relay._set(self, 0)

    def _src_eof(self) -> None:
        self.eof = True
        flushed = not self.pending and not self.inpipe
        if flushed and self.peer.done:
            # Both directions are over and the connection closes in _finish below: close(2)
            # takes the descriptor out of the epoll set, no epoll_ctl is spent on it.
            self.mask = WATCH
        else:
            self._read_off()
        if flushed:
            self._finish()

    def _finish(self) -> None:
        self.done = True
        # When the other direction already finished, close(2) follows at once and sends the
        # FIN itself (nothing is left unread on dst: its own EOF was read).
        if not self.peer.done:
            shutdown_wr(self.dfd)
        self.owner.half_done()

    def poll(self) -> None:
        """Read now as if epoll had reported the source readable (EAGAIN when it is not).

        A safety net for half-closed connections that went quiet: should a wakeup for the
        remaining direction ever be missed (it was, when uvloop watched each relayed socket),
        the peer's close is still seen by the next sweep rather than at drain_timeout. It costs
        one read per such connection per sweep.
        """
        if self.mask & RD and not self.done:
            self.relay.hup = 0  # not called from epoll: no FIN was reported with it
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
                self.relay.stats.bytes_up += n
            else:
                self.relay.stats.bytes_down += n
        return n

    def release(self) -> None:
        """Fold the counters, release the pipe and forget the source descriptor: the connection
        closes (and so unregisters) the sockets right after."""
        self.fold()
        self.relay.forget(self)
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
                self.relay.stats.splice_refused += 1
                return
        self.relay.stats.splice_switches += 1

    def on_splice_readable(self) -> None:
        try:
            n = os.splice(self.sfd, self.pipe_w, self.pipe_size, flags=_SPLICE_FLAGS)
        except _AGAIN:
            return
        except OSError:
            self.owner.close()
            return
        if n == 0:
            self._src_eof()
            return
        self.moved += n
        self.inpipe = n
        if self._drain_pipe() and self.inpipe:
            self._read_off()
            self._write_on()

    def _drain_pipe(self) -> bool:
        """Move what the pipe holds to dst; False when the connection was closed."""
        while self.inpipe:
            try:
                m = os.splice(self.pipe_r, self.dfd, self.inpipe, flags=_SPLICE_FLAGS)
            except _AGAIN:
                return True
            except OSError:
                self.owner.close()
                return False
            self.inpipe -= m
        return True

    def on_splice_writable(self) -> None:
        if not self._drain_pipe() or self.inpipe:
            return
        self._write_off()
        if self.eof:
            self._finish()
        else:
            self._read_on()
