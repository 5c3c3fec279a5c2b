"""Acceptance: hellos split across TCP segments and TLS records, oversize hellos, IPv6 clients."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.router import Router, router
from support.tls_backends import Backend, Pki, client_context, hello, parse_ident, serving
from wire.hellos import big_hello, frame


@pytest.fixture(scope="module")
def farm(pki: Pki) -> Iterator[dict[str, Backend]]:
    made = {
        "caddy": Backend("caddy", pki),
        "turn": Backend("turn", pki),
        "recorder": Backend("recorder", None, record=True),
    }
    with serving(made):
        yield made


@pytest.fixture(scope="module")
def rt(
    tmp_path_factory: pytest.TempPathFactory, farm: dict[str, Backend], event_loop_name: str
) -> Iterator[Router]:
    routes = [
        ("cdn.example.test", ("turn", farm["turn"].addr)),
        ("hello.example.com", ("recorder", farm["recorder"].addr)),
    ]
    with router(
        tmp_path_factory.mktemp("rt"),
        routes=routes,
        fallback=("caddy", farm["caddy"].addr),
        workers=2,
        client_hello_timeout="10s",
    ) as r:
        yield r


def _drain_bio_handshake(
    sock: socket.socket, obj: ssl.SSLObject, out: ssl.MemoryBIO, inc: ssl.MemoryBIO
) -> None:
    while True:
        try:
            obj.do_handshake()
            sock.sendall(out.read())
            return
        except ssl.SSLWantReadError:
            pending = out.read()
            if pending:
                sock.sendall(pending)
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during handshake") from None
            inc.write(data)


def test_real_hello_trickled_in_tiny_tcp_segments(rt: Router, pki: Pki) -> None:
    ctx = client_context(pki)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="cdn.example.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    client_hello = out.read()
    with socket.create_connection(("127.0.0.1", rt.port), timeout=20) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(client_hello), 7):  # ~75 segments of 7 bytes
            s.sendall(client_hello[i : i + 7])
            time.sleep(0.005)
        _drain_bio_handshake(s, obj, out, inc)
        obj.write(b"HELLO\n")
        s.sendall(out.read())
        reply = b""
        while b"\n" not in reply:
            try:
                reply += obj.read(4096)
            except ssl.SSLWantReadError:
                data = s.recv(65536)
                if not data:
                    break
                inc.write(data)
    ident = parse_ident(reply)
    assert (ident["backend"], ident["sni"]) == ("turn", "cdn.example.test")


def test_large_hello_over_many_records_is_routed_and_replayed_byte_for_byte(
    rt: Router, farm: dict[str, Backend]
) -> None:
    # Post-quantum key shares make hellos this large; several records carry them.
    data = frame(big_hello(9000), [1000] * 9) + b"after-the-hello"
    recorder = farm["recorder"]
    before = len(recorder.received)
    with socket.create_connection(("127.0.0.1", rt.port), timeout=20) as s:
        for i in range(0, len(data), 1400):
            s.sendall(data[i : i + 1400])
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""
    recorder.wait_seen(before + 1)
    assert recorder.received[before] == data


def test_oversize_hello_is_refused_and_logged(rt: Router, farm: dict[str, Backend]) -> None:
    data = frame(big_hello(20000), [16000])
    before = len(farm["recorder"].received)
    with socket.create_connection(("127.0.0.1", rt.port), timeout=20) as s:
        try:
            s.sendall(data)
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass  # closed while we were still sending: equally a refusal
    # Counted whatever the log's rate limit did with the line.
    assert rt.wait_metric('hello_failures_total{reason="too_large"}', 1.0) >= 1.0
    assert len(farm["recorder"].received) == before


def test_ipv6_client_with_proxy_v2(tmp_path: Path, pki: Pki) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    with (
        Backend("v6", pki, proxy=True) as backend,
        router(
            tmp_path,
            host="::1",
            routes=[("cdn.example.test", ("v6", backend.addr, "v2"))],
            fallback=("v6", backend.addr, "v2"),
            workers=1,
        ) as r,
    ):
        got = hello(r.port, "cdn.example.test", pki, host="::1")
        assert got["backend"] == "v6" and got["proxy"] == "v2"
        assert got["src"].startswith("::1:")
