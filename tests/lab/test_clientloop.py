"""The client loop against a real keep-alive HTTPS server on loopback: it counts what a real
client sees, and it notices a server that stops answering."""

from __future__ import annotations

import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support.tls_backends import Pki, make_pki

from orama_stealth.lab.clientloop import ClientLoop


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def https(pki: Pki) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.daemon_threads = True
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki.cert.cert_file), str(pki.cert.key_file))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_counts_successes_and_keeps_long_lived_connections_answering(
        https: ThreadingHTTPServer, pki: Pki) -> None:
    port = https.server_address[1]
    with ClientLoop("127.0.0.1", port, "example.test", str(pki.ca_file), interval=0.01,
                    long_lived=3, max_seconds=1.0) as loop:
        time.sleep(0.5)
        assert loop.check_long_lived() == ["", "", ""]
    s = loop.summary()
    assert s.attempts >= 30 and s.failed == 0, s.line()
    assert 0 < s.slowest_handshake < 2.0


def test_a_wrong_name_and_a_closed_port_are_failures(https: ThreadingHTTPServer,
                                                     pki: Pki) -> None:
    port = https.server_address[1]
    with ClientLoop("127.0.0.1", port, "not-in-the-cert.invalid", str(pki.ca_file),
                    interval=0.02, max_connects=5) as loop:
        time.sleep(0.5)
    s = loop.summary()
    assert s.attempts == 5 and s.failed == 5
    assert list(s.errors) == ["tls:CERTIFICATE_VERIFY_FAILED"], s.errors
    https.shutdown()
    https.server_close()
    with ClientLoop("127.0.0.1", port, "example.test", str(pki.ca_file), interval=0.02,
                    max_connects=3) as loop:
        time.sleep(0.3)
    assert loop.summary().errors == {"refused": 3}


def _client_sockets(port: int) -> list[str]:
    """This machine's client-side TCP sockets to `port` in any state but TIME-WAIT (a socket
    the client never closed stays in CLOSE-WAIT once the server has closed its side)."""
    out = subprocess.run(["ss", "-Htan", f"( dport = :{port} )"], capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if not line.startswith("TIME-WAIT")]


def test_the_long_lived_connections_are_closed_when_the_loop_ends(
        https: ThreadingHTTPServer, pki: Pki) -> None:
    # A socket left open would hold a router's draining worker until a timeout.
    port = https.server_address[1]
    with ClientLoop("127.0.0.1", port, "example.test", str(pki.ca_file), interval=0.05,
                    long_lived=3, max_seconds=0.5) as loop:
        assert loop.check_long_lived() == ["", "", ""]
        assert len(_client_sockets(port)) >= 3
    deadline = time.monotonic() + 3
    while _client_sockets(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _client_sockets(port) == []
