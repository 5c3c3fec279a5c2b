"""Acceptance: connection caps, hello and idle timeouts, and a per-address table that forgets."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.router import Router, router
from support.tls_backends import (
    Backend,
    Pki,
    checksum_transfer,
    hello,
    tls_connect,
)


def _routes(turn: Backend) -> list[tuple[str, tuple[str, str]]]:
    return [("cdn.example.test", ("turn", turn.addr))]


@contextlib.contextmanager
def held(port: int, pki: Pki, n: int, source: str | None = None) -> Iterator[list[ssl.SSLSocket]]:
    """n established connections parked on the backend (WAIT), closed on exit."""
    with contextlib.ExitStack() as stack:
        socks = []
        for _ in range(n):
            s = stack.enter_context(tls_connect(port, "cdn.example.test", pki, source=source))
            s.sendall(b"WAIT\n")
            socks.append(s)
        yield socks


def refused(port: int, pki: Pki, source: str | None = None) -> bool:
    """True when the router closes the connection instead of relaying it."""
    try:
        hello(port, "cdn.example.test", pki, source=source)
    except (OSError, ssl.SSLError, ValueError, IndexError):
        return True
    return False


def hello_failures(r: Router) -> float:
    return sum(
        v for k, v in r.metrics().items() if k.startswith("orama_sni_router_hello_failures_total")
    )


def eventually(check: object, timeout: float = 10.0) -> bool:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_global_cap_refuses_the_next_connection(
    tmp_path: Path, pki: Pki, turn: Backend, caddy: Backend
) -> None:
    with router(
        tmp_path,
        routes=_routes(turn),
        fallback=("caddy", caddy.addr),
        workers=2,
        max_concurrent_conns=3,
    ) as r:
        with held(r.port, pki, 3):
            assert refused(r.port, pki)
            r.wait_log(r"Connection limit reached")
        # Slots come back when connections close.
        assert eventually(lambda: not refused(r.port, pki))
        assert r.wait_metric('limit_refusals_total{limit="global"}', 1.0) >= 1.0


def test_per_ip_cap_refuses_that_address_only(
    tmp_path: Path, pki: Pki, turn: Backend, caddy: Backend
) -> None:
    with router(
        tmp_path,
        routes=_routes(turn),
        fallback=("caddy", caddy.addr),
        workers=1,
        max_conns_per_ip=2,
    ) as r:
        with held(r.port, pki, 2, source="127.0.0.61"):
            assert refused(r.port, pki, source="127.0.0.61")
            assert not refused(r.port, pki, source="127.0.0.62")
            line = r.wait_log(r"Connection limit reached")
            assert "127.0.0.61" in line
        assert eventually(lambda: not refused(r.port, pki, source="127.0.0.61"))
        assert r.wait_metric('limit_refusals_total{limit="per_ip"}', 1.0) >= 1.0


@pytest.mark.parametrize(
    "first_bytes",
    [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
    ids=["silent", "partial-hello"],
)
def test_unfinished_hello_is_closed_at_client_hello_timeout(
    tmp_path: Path, pki: Pki, turn: Backend, caddy: Backend, first_bytes: bytes
) -> None:
    with (
        router(
            tmp_path,
            routes=_routes(turn),
            fallback=("caddy", caddy.addr),
            workers=1,
            client_hello_timeout="300ms",
        ) as r,
        socket.create_connection(("127.0.0.1", r.port), timeout=20) as s,
    ):
        s.sendall(first_bytes)  # and then nothing more, ever
        assert s.recv(100) == b""  # closed by the router, not by our 20s timeout
        line = r.wait_log(r"ClientHello peek failed")
        assert "reason=timeout" in line


def test_idle_connection_closed_at_idle_timeout_but_busy_one_lives(
    tmp_path: Path, pki: Pki, turn: Backend, caddy: Backend
) -> None:
    with router(
        tmp_path,
        routes=_routes(turn),
        fallback=("caddy", caddy.addr),
        workers=2,
        idle_timeout="1s",
    ) as r:
        # Busy for ~2.5s (longer than idle_timeout) but never silent for 1s: must survive.
        with tls_connect(r.port, "cdn.example.test", pki) as busy:
            ok = checksum_transfer(busy, upload=25 * 4096, download=1000, chunk=4096, pace=0.1)
            assert ok == (True, True)
        with tls_connect(r.port, "cdn.example.test", pki, timeout=30) as idle:
            idle.sendall(b"WAIT\n")
            started = time.monotonic()
            with contextlib.suppress(ssl.SSLError, ConnectionResetError):
                assert idle.recv(100) == b""
            assert time.monotonic() - started < 25, "closed by our own timeout, not the router"
        assert r.wait_metric("idle_closed_total", 1.0) >= 1.0


@pytest.mark.slow
def test_per_ip_table_empty_after_10000_distinct_addresses(
    tmp_path: Path, pki: Pki, turn: Backend, caddy: Backend
) -> None:
    with router(
        tmp_path,
        routes=_routes(turn),
        fallback=("caddy", caddy.addr),
        workers=2,
        max_conns_per_ip=4,
        max_concurrent_conns=1000,
    ) as r:
        # The gauge is live: three parked connections from three addresses are tracked.
        with contextlib.ExitStack() as stack:
            for i in (1, 2, 3):
                s = stack.enter_context(
                    tls_connect(r.port, "cdn.example.test", pki, source=f"127.9.9.{i}")
                )
                s.sendall(b"WAIT\n")
            assert r.wait_metric("tracked_client_ips", 3.0) == 3.0
        before = hello_failures(r)
        deadline = time.monotonic() + 120
        done = 0
        for i in range(10_000):
            src = f"127.{10 + i // 62500}.{(i // 250) % 250 + 1}.{i % 250 + 1}"
            with socket.socket() as c:
                c.settimeout(10)
                c.bind((src, 0))
                c.connect(("127.0.0.1", r.port))
            done += 1
            if time.monotonic() > deadline:
                break
        assert done == 10_000, f"only {done} connections within the time bound"
        # The kernel accepting them proves nothing: wait until the router has seen every one
        # (each ends as a failed hello, the client sent nothing) before reading the table.
        assert eventually(lambda: hello_failures(r) >= before + 10_000, timeout=60), (
            f"router handled {hello_failures(r) - before} of 10000 connections"
        )
        assert r.wait_metric("tracked_client_ips", 0.0, timeout=30) == 0.0
        assert r.proc.poll() is None
