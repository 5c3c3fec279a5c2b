"""The STUN probe against small real TLS servers that misbehave in specific ways."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from orama_stealth.lab.pki import TestCA
from orama_stealth.probe.model import ProbeSpec
from orama_stealth.probe.runner import run_probe
from orama_stealth.wire import stun

Behaviour = Callable[[ssl.SSLSocket, bytes], None]


@contextmanager
def tls_server(
    ca: TestCA, tmp_path: Path, behaviour: Behaviour, days: int = 30
) -> Iterator[int]:
    """One-connection-at-a-time TLS server on loopback; `behaviour` gets the first request."""
    cert = ca.issue(["odd.example.test"], tmp_path, "odd", days=days)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert.cert_file, cert.key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            with suppress(OSError), ctx.wrap_socket(raw, server_side=True) as conn:
                conn.settimeout(5)
                first = conn.recv(65536)
                if first:  # the TLS check connects and leaves without a word
                    behaviour(conn, first)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        listener.close()


def wrong_txid(conn: ssl.SSLSocket, first: bytes) -> None:
    req = stun.decode(first[:20 + int.from_bytes(first[2:4], "big")])
    conn.sendall(stun.encode(
        stun.BINDING, stun.MessageClass.SUCCESS, bytes(12),
        [(stun.XOR_MAPPED_ADDRESS, stun.encode_xor_address(("127.0.0.1", 1), bytes(12)))],
    ))
    assert req.method == stun.BINDING
    conn.recv(1)


def garbage(conn: ssl.SSLSocket, first: bytes) -> None:
    conn.sendall(b"\x80garbage-that-is-not-stun-at-all")
    conn.recv(1)


def closes(conn: ssl.SSLSocket, first: bytes) -> None:
    pass


def silent(conn: ssl.SSLSocket, first: bytes) -> None:
    with suppress(OSError):
        conn.recv(65536)  # swallows the blank line too, answers nothing
        conn.recv(1)


@pytest.mark.parametrize(
    ("behaviour", "step", "words"),
    [
        (wrong_txid, "binding", "matches no request we sent"),
        (garbage, "binding", "is not a TURN/STUN server"),
        (closes, "binding", "closed the connection without answering"),
        (silent, "binding", "not one byte from"),
    ],
)
def test_misbehaving_peer(
    ca: TestCA, tmp_path: Path, behaviour: Behaviour, step: str, words: str
) -> None:
    ca_file = ca.write_ca(tmp_path / "ca.pem")
    with tls_server(ca, tmp_path, behaviour) as port:
        report = run_probe(ProbeSpec("127.0.0.1", port, sni="odd.example.test",
                                     ca_file=str(ca_file), stun=True, timeout=1.0))
    check = report.check("stun")
    assert check is not None and not check.ok
    assert check.step == step
    assert words in (check.error or ""), check.error


def test_expired_certificate(ca: TestCA, tmp_path: Path) -> None:
    ca_file = ca.write_ca(tmp_path / "ca.pem")
    with tls_server(ca, tmp_path, closes, days=0) as port:
        report = run_probe(ProbeSpec("127.0.0.1", port, sni="odd.example.test",
                                     ca_file=str(ca_file)))
    tls = report.check("tls")
    assert tls is not None and not tls.ok
    assert "certificate has expired" in (tls.error or ""), tls.error
    assert tls.details["days_left"] <= 0


def test_system_store_does_not_trust_the_test_ca(ca: TestCA, tmp_path: Path) -> None:
    with tls_server(ca, tmp_path, closes) as port:
        report = run_probe(ProbeSpec("127.0.0.1", port, sni="odd.example.test"))
    tls = report.check("tls")
    assert tls is not None and not tls.ok
    assert "does not validate against the system trust store" in (tls.error or ""), tls.error
    assert tls.details["chain"][0]["names"] == ["odd.example.test"]


def test_min_days(ca: TestCA, tmp_path: Path) -> None:
    ca_file = ca.write_ca(tmp_path / "ca.pem")
    with tls_server(ca, tmp_path, closes, days=5) as port:
        spec = ProbeSpec("127.0.0.1", port, sni="odd.example.test", ca_file=str(ca_file),
                         min_days=14)
        tls = run_probe(spec).check("tls")
        assert tls is not None and not tls.ok
        assert "expires in 4 days" in (tls.error or ""), tls.error
        assert "expected at least 14" in (tls.error or "")
        tls = run_probe(ProbeSpec("127.0.0.1", port, sni="odd.example.test",
                                  ca_file=str(ca_file), min_days=3)).check("tls")
        assert tls is not None and tls.ok, tls.error
