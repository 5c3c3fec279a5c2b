"""The STUN probe against small real TLS servers that misbehave in specific ways."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from orama_stealth import stun
from orama_stealth.lab.pki import TestCA
from orama_stealth.probe.model import ProbeSpec
from orama_stealth.probe.runner import run_probe

Behaviour = Callable[[ssl.SSLSocket, bytes], None]


@contextmanager
def tls_server(ca: TestCA, tmp_path: Path, behaviour: Behaviour) -> Iterator[int]:
    """One-connection-at-a-time TLS server on loopback; `behaviour` gets the first request."""
    cert = ca.issue(["odd.example.test"], tmp_path, "odd")
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
