"""The worker's event loop on its own: timers, descriptors, errors, threads and signals."""

from __future__ import annotations

import os
import signal
import socket

from orama_stealth.router.evloop import _COMPACT_AT, Loop


def test_timers_run_in_order_and_cancelled_ones_never_run() -> None:
    loop = Loop()
    ran: list[str] = []
    loop.call_later(0.03, lambda: ran.append("c"))
    loop.call_later(0.01, lambda: ran.append("a"))
    loop.call_later(0.02, lambda: ran.append("x")).cancel()
    loop.call_later(0.02, lambda: ran.append("b"))
    loop.call_later(0.05, loop.stop)
    loop.run_forever()
    loop.close()
    assert ran == ["a", "b", "c"]


def test_compaction_drops_cancelled_timers_and_keeps_live_ones() -> None:
    loop = Loop()
    ran: list[int] = []
    for _ in range(_COMPACT_AT * 2):
        loop.call_later(60, lambda: ran.append(-1)).cancel()
    loop.call_later(0.01, lambda: ran.append(1))
    loop.call_later(0.02, loop.stop)
    loop.run_forever()
    assert ran == [1]
    assert len(loop._heap) < _COMPACT_AT  # the cancelled ones were dropped
    loop.close()


def test_readers_writers_and_forget() -> None:
    loop = Loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    got: list[bytes] = []

    def on_read() -> None:
        got.append(a.recv(100))
        loop.stop()

    loop.add_reader(a.fileno(), on_read)
    loop.add_writer(b.fileno(), lambda: (b.send(b"hi"), loop.remove_writer(b.fileno())))
    loop.run_forever()
    assert got == [b"hi"]
    # Forgotten and closed: epoll no longer reports it, and the number can be watched again.
    fd = a.fileno()
    loop.forget(fd)
    assert fd not in loop.readers and fd not in loop._masks
    a.close()
    c, d = socket.socketpair()
    loop.add_reader(c.fileno(), loop.stop)
    d.send(b"x")
    loop.run_forever()
    for s in (b, c, d):
        s.close()
    loop.close()


def test_an_exception_in_a_callback_is_reported_and_the_loop_goes_on() -> None:
    errors: list[str] = []
    loop = Loop(on_error=lambda exc, where: errors.append(str(exc)))

    def boom() -> None:
        raise RuntimeError("boom")

    r, w = os.pipe()
    loop.add_reader(r, boom)
    os.write(w, b"x")
    loop.call_later(0.02, lambda: (loop.remove_reader(r), loop.call_later(0.01, loop.stop)))
    loop.run_forever()
    assert errors and set(errors) == {"boom"}
    os.close(r)
    os.close(w)
    loop.close()


def test_run_in_thread_hands_result_and_error_back_to_the_loop() -> None:
    loop = Loop()
    out: list[object] = []

    def fail() -> int:
        raise OSError("no such host")

    loop.run_in_thread(lambda: 41 + 1, lambda res, err: out.append(res))
    loop.run_in_thread(fail, lambda res, err: (out.append(err), loop.stop()))
    loop.call_later(5, loop.stop)  # bound: never hangs the suite
    loop.run_forever()
    loop.close()
    assert out[0] == 42
    assert isinstance(out[1], OSError)


def test_signal_handler_runs_from_the_loop() -> None:
    loop = Loop()
    got: list[str] = []
    old = signal.getsignal(signal.SIGUSR2)
    try:
        loop.add_signal_handler(signal.SIGUSR2, lambda: (got.append("usr2"), loop.stop()))
        loop.call_later(0.01, lambda: os.kill(os.getpid(), signal.SIGUSR2))
        loop.call_later(5, loop.stop)
        loop.run_forever()
    finally:
        signal.signal(signal.SIGUSR2, old)
        signal.set_wakeup_fd(-1)
        loop.close()
    assert got == ["usr2"]


def test_reader_sees_the_peers_fin_reported_with_its_data() -> None:
    loop = Loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    seen: list[tuple[bytes, bool]] = []

    def on_read() -> None:
        seen.append((a.recv(100), bool(loop.hup)))
        if len(seen) == 1:
            b.send(b"last")
            b.shutdown(socket.SHUT_WR)
        else:
            loop.stop()

    loop.add_reader(a.fileno(), on_read)
    b.send(b"first")
    loop.run_forever()
    loop.close()
    a.close()
    b.close()
    assert seen == [(b"first", False), (b"last", True)]
