"""The worker's event loop: one level-triggered epoll for every descriptor, a timer heap, signals
through a wakeup descriptor, and blocking calls (name lookups) on a small thread pool.

Why not asyncio or uvloop: a routed connection is a handful of readiness callbacks, so the
loop's own cost per event is most of the Python a connection costs. Here an event is one dict
lookup and one call, everything lives in a single epoll (no second epoll nested inside the
loop's, which cost one more epoll_wait per wakeup), a watched descriptor costs one dict entry
(uvloop keeps two handles of about 0.6 KiB), and a descriptor that is about to be closed is
simply forgotten: close(2) takes it out of the epoll set, so no epoll_ctl is spent on it.

The surface is the part of asyncio's loop the worker uses (add/remove_reader/writer, call_later,
call_at, time, add_signal_handler, run_forever, stop), so the code reads the same.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import heapq
import itertools
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any

# Events handed out per epoll_wait; more stay pending (level-triggered) for the next round, so
# timers and signals still run while every connection is busy.
MAX_EVENTS = 256
_IN = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_OUT = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
# Readers are watched for the peer's FIN too, so a reader that drained the socket knows it
# reached the end without one more read that returns 0 (see Loop.hup).
_WATCH_IN = select.EPOLLIN | select.EPOLLRDHUP
RDHUP = select.EPOLLRDHUP
# Cancelled timers stay in the heap until due; rebuild it once they are most of it (each setup
# phase arms one and nearly always cancels it).
_COMPACT_AT = 1024

Callback = Callable[[], None]
ErrorHandler = Callable[[BaseException, object], None]


class Timer:
    """What call_later/call_at return; cancel() before it runs and it never does."""

    __slots__ = ("cancelled", "cb", "loop", "when")

    def __init__(self, loop: Loop, when: float, cb: Callback) -> None:
        self.loop = loop
        self.when = when
        self.cb = cb
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.loop._cancelled += 1


def _report(exc: BaseException, where: object) -> None:
    # Replaced by the worker's logger; this default keeps a bare loop usable in tests.
    import traceback

    traceback.print_exception(exc)


class Loop:
    __slots__ = (
        "_cancelled",
        "_done",
        "_heap",
        "_masks",
        "_seq",
        "_signals",
        "_stopping",
        "_threads",
        "_wake_r",
        "_wake_w",
        "ep",
        "hup",
        "on_error",
        "readers",
        "writers",
    )

    def __init__(self, on_error: ErrorHandler = _report) -> None:
        self.ep = select.epoll()
        self.on_error = on_error
        # While a reader callback runs: non-zero when epoll also reported the peer's FIN
        # (EPOLLRDHUP). Everything the peer sent before it is then already queued, so a read
        # that returns less than it asked for has reached the end.
        self.hup = 0
        self.readers: dict[int, Callback] = {}
        self.writers: dict[int, Callback] = {}
        self._masks: dict[int, int] = {}
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._cancelled = 0
        self._stopping = False
        self._signals: dict[int, Callback] = {}
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        # Results of thread-pool calls, handed over through the wakeup descriptor.
        self._done: collections.deque[Callback] = collections.deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add_reader(self._wake_r, self._on_wake)

    # --- descriptors -------------------------------------------------------------------------

    def _set(self, fd: int, new: int) -> None:
        old = self._masks.get(fd, 0)
        if new == old:
            return
        if not new:
            del self._masks[fd]
            with contextlib.suppress(OSError):
                self.ep.unregister(fd)
            return
        self._masks[fd] = new
        if not old:
            try:
                self.ep.register(fd, new)
            except FileExistsError:
                self.ep.modify(fd, new)
        else:
            try:
                self.ep.modify(fd, new)
            except FileNotFoundError:
                self.ep.register(fd, new)

    def add_reader(self, fd: int, cb: Callback) -> None:
        self.readers[fd] = cb
        self._set(fd, self._masks.get(fd, 0) | _WATCH_IN)

    def remove_reader(self, fd: int) -> None:
        if self.readers.pop(fd, None) is not None:
            self._set(fd, self._masks.get(fd, 0) & ~_WATCH_IN)

    def add_writer(self, fd: int, cb: Callback) -> None:
        self.writers[fd] = cb
        self._set(fd, self._masks.get(fd, 0) | select.EPOLLOUT)

    def remove_writer(self, fd: int) -> None:
        if self.writers.pop(fd, None) is not None:
            self._set(fd, self._masks.get(fd, 0) & ~select.EPOLLOUT)

    def forget(self, fd: int) -> None:
        """Drop fd's callbacks without epoll_ctl: call it right before closing fd, whose
        close(2) removes it from the epoll set (it is never shared with another process)."""
        self.readers.pop(fd, None)
        self.writers.pop(fd, None)
        self._masks.pop(fd, None)

    # --- time --------------------------------------------------------------------------------

    def time(self) -> float:
        return time.monotonic()

    def call_at(self, when: float, cb: Callback) -> Timer:
        t = Timer(self, when, cb)
        heapq.heappush(self._heap, (when, next(self._seq), t))
        return t

    def call_later(self, delay: float, cb: Callback) -> Timer:
        return self.call_at(time.monotonic() + delay, cb)

    def _run_timers(self) -> float:
        """Run what is due; return the poll timeout until the next timer (-1: none)."""
        heap = self._heap
        if self._cancelled > _COMPACT_AT and self._cancelled * 2 > len(heap):
            self._heap = heap = [e for e in heap if not e[2].cancelled]
            heapq.heapify(heap)
            self._cancelled = 0
        now = time.monotonic()
        while heap:
            when, _seq, t = heap[0]
            if t.cancelled:
                heapq.heappop(heap)
                self._cancelled -= 1
                continue
            if when > now:
                return when - now
            heapq.heappop(heap)
            t.cancelled = True  # so a late cancel() does not count it twice
            self._call(t.cb)
            if self._stopping:
                return 0
        return -1

    # --- signals and threads -----------------------------------------------------------------

    def add_signal_handler(self, sig: int, cb: Callback) -> None:
        """cb runs from the loop, not inside the signal handler; the handler only wakes it."""
        self._signals[sig] = cb
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        cb = self._signals.get(signum)
        if cb is not None:
            self._done.append(cb)

    def run_in_thread(self, fn: Callable[[], Any], then: Callable[[Any, BaseException | None],
                      None]) -> None:
        """fn() on a pool thread; then(result, error) afterwards on the loop."""
        if self._threads is None:
            self._threads = concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="orama-resolve"
            )

        def finished(f: concurrent.futures.Future[Any]) -> None:
            err = f.exception()
            self._done.append(lambda: then(None if err else f.result(), err))
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"\0")

        self._threads.submit(fn).add_done_callback(finished)

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        done = self._done
        while done:
            self._call(done.popleft())

    # --- running -----------------------------------------------------------------------------

    def _call(self, cb: Callback) -> None:
        try:
            cb()
        except Exception as e:  # one connection's bug must not take the others down
            self.on_error(e, cb)

    def stop(self) -> None:
        self._stopping = True

    def run_forever(self) -> None:
        self._stopping = False
        poll = self.ep.poll
        readers, writers = self.readers, self.writers
        on_error = self.on_error
        in_, out, rdhup = _IN, _OUT, RDHUP  # locals: this loop runs once per event
        timeout = self._run_timers()
        while not self._stopping:
            try:
                events = poll(timeout, MAX_EVENTS)
            except InterruptedError:
                events = []
            for fd, ev in events:
                # Look each callback up when its turn comes: an earlier one in this batch may
                # have closed a connection and forgotten its descriptors.
                try:
                    if ev & in_:
                        cb = readers.get(fd)
                        if cb is not None:
                            self.hup = ev & rdhup
                            cb()
                    if ev & out:
                        cb = writers.get(fd)
                        if cb is not None:
                            cb()
                except Exception as e:
                    on_error(e, cb)
            if self._done:
                self._on_wake()
            timeout = self._run_timers() if self._heap else -1
        self._stopping = False

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None
        self.ep.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.readers.clear()
        self.writers.clear()
        self._masks.clear()
