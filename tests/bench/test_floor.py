"""The bench's floor relay moves bytes both ways intact, bulk included, and passes half-close on."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.procs import free_port, running, wait_port

ROOT = Path(__file__).resolve().parents[2]
REPLY = 3 << 20  # enough full reads in a row to switch the direction to splice(2)


def _serve(lsock: socket.socket, stop: threading.Event) -> None:
    """Read to EOF, then answer with the digest of what came and REPLY bytes, then close."""
    lsock.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = lsock.accept()
        except TimeoutError:
            continue
        # The readiness probe connects and leaves at once: its reply fails, the next must not.
        with conn, contextlib.suppress(OSError):
            conn.settimeout(20)
            h = hashlib.sha256()
            while chunk := conn.recv(1 << 16):
                h.update(chunk)
            conn.sendall(h.digest() + bytes(range(256)) * (REPLY // 256))


@pytest.fixture
def floor(tmp_path: Path) -> Iterator[int]:
    upstream = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    t = threading.Thread(target=_serve, args=(upstream, stop), daemon=True)
    t.start()
    port = free_port()
    argv = [sys.executable, str(ROOT / "bench" / "floor.py"), "--listen", f"127.0.0.1:{port}",
            "--backend", f"127.0.0.1:{upstream.getsockname()[1]}", "--workers", "2"]
    try:
        with running(argv, tmp_path / "floor.log") as proc:
            wait_port("127.0.0.1", port, proc, tmp_path / "floor.log")
            yield port
    finally:
        stop.set()
        t.join(5)
        upstream.close()


def _exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)  # the server answers only once it has seen our EOF
        out = bytearray()
        while chunk := c.recv(1 << 16):
            out += chunk
        return bytes(out)


@pytest.mark.parametrize("size", [5, 100_000, 5 << 20])
def test_floor_relays_both_ways_through_half_close(floor: int, size: int) -> None:
    payload = bytes((i * 7) & 0xFF for i in range(size))
    got = _exchange(floor, payload)
    assert got[:32] == hashlib.sha256(payload).digest()
    assert got[32:] == bytes(range(256)) * (REPLY // 256)


def test_floor_serves_connections_one_after_another(floor: int) -> None:
    for i in range(20):
        payload = str(i).encode() * 100
        assert _exchange(floor, payload)[:32] == hashlib.sha256(payload).digest()
