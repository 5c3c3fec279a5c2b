"""Log lines: key=value format and per-event rate limiting."""

from __future__ import annotations

import os

from orama_stealth.router.logs import Logger, format_line


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def read_lines(fd: int) -> list[str]:
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 1 << 20)
    except BlockingIOError:
        return []
    return data.decode().splitlines()


def test_format_is_grep_friendly_key_value() -> None:
    line = format_line(
        "warn", "dial_failed", "backend dial failed",
        {"backend": "turn-tls", "reason": 'refused "x"\nnext', "skip": None}, 0.5,
    )
    assert line.startswith("ts=1970-01-01T00:00:00.500Z level=warn event=dial_failed ")
    assert 'msg="backend dial failed"' in line
    assert "backend=turn-tls " in line
    assert 'reason="refused \\"x\\"\\nnext"' in line
    assert "skip" not in line
    assert line.endswith("\n") and line.count("\n") == 1


def test_flood_prints_one_line_per_second_per_event_with_suppressed_count() -> None:
    r, w = os.pipe()
    try:
        clock = Clock()
        log = Logger(fd=w, clock=clock, worker=0)
        printed = [log.limited("conn_limit", "Connection limit reached", client=f"c{i}")
                   for i in range(1000)]
        assert printed.count(True) == 1
        # Another kind is not held back by the first one's flood.
        assert log.limited("dial_failed", "backend dial failed")
        clock.now += 1.0
        assert log.limited("conn_limit", "Connection limit reached", client="late")
        lines = read_lines(r)
        assert len(lines) == 3
        assert "Connection limit reached" in lines[0] and "suppressed" not in lines[0]
        assert "client=late" in lines[2] and "suppressed=999" in lines[2]
        assert all("worker=0" in line for line in lines)
    finally:
        os.close(r)
        os.close(w)


def test_kinds_of_one_event_are_limited_separately() -> None:
    r, w = os.pipe()
    try:
        log = Logger(fd=w, clock=Clock())
        for reason in ("timeout", "malformed", "timeout", "malformed"):
            log.limited("hello_failed", "ClientHello peek failed", kind=f"h:{reason}",
                        reason=reason)
        lines = read_lines(r)
        assert len(lines) == 2
        assert "reason=timeout" in lines[0] and "reason=malformed" in lines[1]
    finally:
        os.close(r)
        os.close(w)


def test_held_back_counts_are_reported_after_the_window() -> None:
    r, w = os.pipe()
    try:
        clock = Clock()
        log = Logger(fd=w, clock=clock)
        for _ in range(5):
            log.limited("hello_failed", "ClientHello peek failed", reason="malformed")
        log.flush_suppressed()
        assert len(read_lines(r)) == 1  # window not over yet
        clock.now += 1.5
        log.flush_suppressed()
        lines = read_lines(r)
        assert len(lines) == 1 and "event=hello_failed" in lines[0] and "suppressed=4" in lines[0]
        assert 'msg="ClientHello peek failed"' in lines[0]
        log.flush_suppressed()
        assert read_lines(r) == []
    finally:
        os.close(r)
        os.close(w)


def test_a_tally_prints_once_per_second_with_the_count_since_the_last_line() -> None:
    r, w = os.pipe()
    try:
        clock = Clock()
        log = Logger(fd=w, clock=clock)
        printed = [log.tally("hello_evicted", "evicted", stage="hello", n=i) for i in range(7)]
        assert printed == [True] + [False] * 6
        log.flush_suppressed()
        lines = read_lines(r)
        assert len(lines) == 1 and "count=1" in lines[0] and "n=0" in lines[0]
        clock.now += 1.0
        log.flush_suppressed()  # the six held back, with the latest one's fields
        lines = read_lines(r)
        assert len(lines) == 1 and "count=6" in lines[0] and "n=6" in lines[0]
        assert "event=hello_evicted" in lines[0]
        clock.now += 0.5
        assert not log.tally("hello_evicted", "evicted", n=7)  # within the window again
        clock.now += 0.6
        assert log.tally("hello_evicted", "evicted", n=8)
        lines = read_lines(r)
        assert len(lines) == 1 and "count=2" in lines[0] and "n=8" in lines[0]
        log.flush_suppressed()
        assert read_lines(r) == []
    finally:
        os.close(r)
        os.close(w)
