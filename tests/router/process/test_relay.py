"""Acceptance: bytes arrive intact both ways, half-close works, PROXY headers carry the client."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.router import BackendSpec, Router, router
from support.tls_backends import (
    Backend,
    Pki,
    checksum_transfer,
    hello,
    parse_ident,
    recv_all,
    serving,
    shutdown_write,
    tls_connect,
)


@pytest.fixture(scope="module")
def farm(pki: Pki) -> Iterator[dict[str, Backend]]:
    made = {
        "caddy": Backend("caddy", pki),
        "turn": Backend("turn", pki),
        "pp1": Backend("pp1", pki, proxy=True),
        "pp2": Backend("pp2", pki, proxy=True),
        "pp-fallback": Backend("pp-fallback", pki, proxy=True),
        "plain": Backend("plain", None),
        "plain-pp": Backend("plain-pp", None, proxy=True),
    }
    with serving(made):
        yield made


@pytest.fixture(scope="module", params=[1, 2], ids=["workers1", "workers2"])
def rt(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    farm: dict[str, Backend],
    event_loop_name: str,
) -> Iterator[Router]:
    routes: list[tuple[str, BackendSpec]] = [
        ("cdn.example.test", ("turn", farm["turn"].addr)),
        ("v1.example.test", ("pp1", farm["pp1"].addr, "v1")),
        ("v2.example.test", ("pp2", farm["pp2"].addr, "v2")),
    ]
    with router(
        tmp_path_factory.mktemp("rt"),
        routes=routes,
        workers=request.param,
        fallback=("caddy", farm["caddy"].addr),
        tcp_backends={
            "http": ("plain-pp", farm["plain-pp"].addr, "v1"),
            "raw": ("plain", farm["plain"].addr),
        },
    ) as r:
        yield r


def test_multi_megabyte_transfer_both_ways(rt: Router, pki: Pki) -> None:
    with tls_connect(rt.port, "cdn.example.test", pki) as s:
        sent_ok, received_ok = checksum_transfer(s, upload=8 << 20, download=12 << 20)
    assert sent_ok, "backend's sha256 of the upload differs"
    assert received_ok, "download differs from the pattern"


def test_half_close_client_still_receives_the_reply(rt: Router, pki: Pki) -> None:
    # The backend only answers after it sees the client's FIN: if the router tore down both
    # directions on the first FIN, this reply would never arrive.
    with tls_connect(rt.port, "cdn.example.test", pki) as s:
        s.sendall(b"SUM 300000\n" + b"x" * 1000)
        shutdown_write(s)
        reply = recv_all(s)
    head, _, body = reply.partition(b"\n")
    assert head.endswith(b" n=1000")
    assert len(body) == 300000


@pytest.mark.parametrize("size", [1, 700, 16383, 16384, 65535, 65536, 200_001])
def test_last_bytes_sent_with_the_fin_all_arrive(rt: Router, size: int) -> None:
    # The backend answers after the client's FIN and closes at once, so its last bytes and its
    # FIN arrive together: the router may finish that direction without a read that returns 0
    # (EPOLLRDHUP) only when nothing is left, at every reply size around its buffer's size.
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", rt.tcp_ports["raw"]), timeout=15) as s:
            s.sendall(b"SUM %d\n" % size + b"z" * 10)
            s.shutdown(socket.SHUT_WR)
            reply = recv_all(s)
        head, _, body = reply.partition(b"\n")
        assert head.endswith(b" n=10")
        assert len(body) == size


@pytest.mark.parametrize(("sni", "version"), [("v1.example.test", "v1"), ("v2.example.test", "v2")])
def test_proxy_header_carries_the_real_client_address(
    rt: Router, pki: Pki, farm: dict[str, Backend], sni: str, version: str
) -> None:
    # A distinct loopback source address, so the header cannot be right by accident.
    with tls_connect(rt.port, sni, pki, source="127.0.0.42") as s:
        local = s.getsockname()
        s.sendall(b"HELLO\n")
        ident = parse_ident(recv_all(s))
    assert ident["proxy"] == version
    assert ident["src"] == f"127.0.0.42:{local[1]}"
    assert ident["sni"] == sni


def test_proxy_header_on_the_tcp_listener(rt: Router) -> None:
    with socket.create_connection(
        ("127.0.0.1", rt.tcp_ports["http"]), source_address=("127.0.0.43", 0), timeout=15
    ) as s:
        port = s.getsockname()[1]
        s.sendall(b"HELLO\n")
        ident = parse_ident(recv_all(s))
    assert (ident["backend"], ident["proxy"]) == ("plain-pp", "v1")
    assert ident["src"] == f"127.0.0.43:{port}"


def test_plain_tcp_listener_forwards_bytes_both_ways(rt: Router) -> None:
    with socket.create_connection(("127.0.0.1", rt.tcp_ports["raw"]), timeout=15) as s:
        s.sendall(b"SUM 200000\n" + b"y" * 500000)
        s.shutdown(socket.SHUT_WR)
        reply = recv_all(s)
    head, _, body = reply.partition(b"\n")
    assert head.endswith(b" n=500000") and len(body) == 200000


def test_client_bytes_after_the_hello_are_replayed_exactly(rt: Router, pki: Pki) -> None:
    # The hello and the first application data usually share a segment: none may be lost.
    with tls_connect(rt.port, "cdn.example.test", pki) as s:
        s.sendall(b"HELLO\n")
        assert parse_ident(recv_all(s))["backend"] == "turn"


def test_fallback_still_works_next_to_proxy_routes(rt: Router, pki: Pki) -> None:
    assert hello(rt.port, "other.example.test", pki)["backend"] == "caddy"


def test_bytes_are_counted_while_a_connection_is_open(
    tmp_path: Path, farm: dict[str, Backend]
) -> None:
    # Live connections' bytes reach the counters at each sweep (0.1 s with a 1 s
    # half_close_timeout), not only when they close.
    up = 'orama_sni_router_bytes_total{direction="client_to_backend"}'
    with router(
        tmp_path, routes=[], fallback=("caddy", farm["caddy"].addr),
        tcp_backends={"raw": ("plain", farm["plain"].addr)}, half_close_timeout="1s",
    ) as r, socket.create_connection(("127.0.0.1", r.tcp_ports["raw"]), timeout=15) as s:
        s.sendall(b"WAIT\n" + b"w" * 30000)
        deadline = time.monotonic() + 10
        while r.metric(up, default=0.0) < 30005 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert r.metric(up) == 30005
        assert r.metric("active_connections") == 1
