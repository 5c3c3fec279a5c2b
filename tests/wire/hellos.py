"""Real captured ClientHellos and a builder for synthetic ones (any size, any record split)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "hellos"
NAME = "hello.example.com"

# fixture file stem -> (expected SNI, expected ALPN); the captures come from capture_hellos.py.
EXPECTED: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "openssl_tls13_sni": (NAME, ()),
    "openssl_tls12_sni": (NAME, ()),
    "openssl_nosni": (None, ()),
    "openssl_alpn": (NAME, ("h2", "http/1.1")),
    "openssl_acme": (NAME, ("acme-tls/1",)),
    "openssl_frag512": (NAME, tuple(c * 200 for c in "xyz")),
    "openssl_upper_dot": (NAME, ()),
    "curl": (NAME, ("h2", "http/1.1")),
    "curl_http11": (NAME, ("http/1.1",)),
    "python_ssl_sni": (NAME, ()),
    "python_ssl_alpn": (NAME, ("h2", "http/1.1")),
    "python_ssl_nosni": (None, ()),
}


def load(name: str) -> bytes:
    return (FIXTURES / f"{name}.bin").read_bytes()


def all_fixtures() -> dict[str, bytes]:
    return {name: load(name) for name in EXPECTED}


def records(data: bytes) -> list[tuple[int, bytes]]:
    """Split a byte stream into (content type, fragment) records."""
    out = []
    p = 0
    while p < len(data):
        n = int.from_bytes(data[p + 3 : p + 5], "big")
        out.append((data[p], data[p + 5 : p + 5 + n]))
        p += 5 + n
    return out


def handshake_bytes(data: bytes) -> bytes:
    return b"".join(frag for _, frag in records(data))


def frame(handshake: bytes, sizes: list[int], version: bytes = b"\x03\x01") -> bytes:
    """Wrap handshake bytes into records of the given fragment sizes (the last takes the rest)."""
    out = bytearray()
    p = 0
    for n in [*sizes, len(handshake)]:
        if p >= len(handshake):
            break
        frag = handshake[p : p + max(1, n)]
        out += b"\x16" + version + struct.pack("!H", len(frag)) + frag
        p += len(frag)
    return bytes(out)


def ext(etype: int, body: bytes) -> bytes:
    return struct.pack("!HH", etype, len(body)) + body


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + struct.pack("!H", len(n)) + n for n in names)
    return ext(0, struct.pack("!H", len(entries)) + entries)


def alpn_ext(*protos: bytes) -> bytes:
    entries = b"".join(bytes([len(p)]) + p for p in protos)
    return ext(16, struct.pack("!H", len(entries)) + entries)


def client_hello(extensions: list[bytes] | None, session_id: bytes = b"\x00" * 32) -> bytes:
    """A ClientHello handshake message (4-byte header + body)."""
    body = b"\x03\x03" + os.urandom(32) + bytes([len(session_id)]) + session_id
    body += struct.pack("!H", 4) + b"\x13\x01\x13\x02" + b"\x01\x00"
    if extensions is not None:
        exts = b"".join(extensions)
        body += struct.pack("!H", len(exts)) + exts
    return b"\x01" + len(body).to_bytes(3, "big") + body


def big_hello(size: int, sni: bytes = NAME.encode()) -> bytes:
    """A ClientHello handshake message of exactly `size` bytes, grown with a padding extension."""
    base = client_hello([sni_ext(sni), alpn_ext(b"h2"), ext(21, b"")])
    pad = size - len(base)
    assert pad >= 0
    return client_hello([sni_ext(sni), alpn_ext(b"h2"), ext(21, b"\x00" * pad)])
