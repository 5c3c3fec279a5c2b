"""Capture real ClientHellos from real TLS clients into tests/fixtures/hellos/.

Run: python3 tests/wire/capture_hellos.py [OUTDIR]

Each client connects to a loopback socket that answers nothing; the bytes it sends until its
hello is complete are saved verbatim as `<name>.bin`. Framing here is deliberately independent of
orama_stealth.wire.clienthello (records are counted by hand) so the fixtures cross-check the reader.
The clients then fail their handshake; that is expected.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "fixtures" / "hellos"
NAME = "hello.example.com"
# Three long protocol names push a default hello well past 512 bytes, so -max_send_frag 512
# really splits it into several records.
LONG_ALPN = ",".join(c * 200 for c in "xyz")


def _read_hello(conn: socket.socket, timeout: float = 10.0) -> bytes:
    conn.settimeout(timeout)
    buf = b""
    hs = b""
    pos = 0
    while True:
        while len(buf) - pos >= 5:
            rlen = int.from_bytes(buf[pos + 3 : pos + 5], "big")
            if len(buf) - pos - 5 < rlen:
                break
            hs += buf[pos + 5 : pos + 5 + rlen]
            pos += 5 + rlen
            if len(hs) >= 4 and len(hs) >= 4 + int.from_bytes(hs[1:4], "big"):
                return buf[:pos]
        chunk = conn.recv(65536)
        if not chunk:
            raise RuntimeError(f"client closed after {len(buf)} bytes")
        buf += chunk


def capture(client: Callable[[int], None]) -> bytes:
    """Listen on loopback, run `client(port)` in a thread, return the hello it sent."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        t = threading.Thread(target=client, args=(port,), daemon=True)
        t.start()
        srv.settimeout(15)
        conn, _ = srv.accept()
        with conn:
            data = _read_hello(conn)
        t.join(20)
        return data


def _run(argv: list[str]) -> None:
    subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=20, check=False)


def openssl(*args: str) -> Callable[[int], None]:
    return lambda port: _run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args])


def curl(*args: str) -> Callable[[int], None]:
    def go(port: int) -> None:
        url = f"https://{NAME}:{port}/"
        _run(
            ["curl", "-sk", "--max-time", "10", "--resolve", f"{NAME}:{port}:127.0.0.1", *args, url]
        )

    return go


def python_ssl(server_hostname: str | None, alpn: list[str] | None = None) -> Callable[[int], None]:
    def go(port: int) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if alpn:
            ctx.set_alpn_protocols(alpn)
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as s,
                ctx.wrap_socket(s, server_hostname=server_hostname),
            ):
                pass
        except (OSError, ssl.SSLError):
            pass

    return go


# name -> (client, expected SNI, expected ALPN)
CLIENTS: dict[str, tuple[Callable[[int], None], str | None, tuple[str, ...]]] = {
    "openssl_tls13_sni": (openssl("-servername", NAME, "-tls1_3"), NAME, ()),
    "openssl_tls12_sni": (openssl("-servername", NAME, "-tls1_2"), NAME, ()),
    "openssl_nosni": (openssl("-noservername"), None, ()),
    "openssl_alpn": (
        openssl("-servername", NAME, "-alpn", "h2,http/1.1"),
        NAME,
        ("h2", "http/1.1"),
    ),
    "openssl_acme": (openssl("-servername", NAME, "-alpn", "acme-tls/1"), NAME, ("acme-tls/1",)),
    "openssl_frag512": (
        openssl("-servername", NAME, "-max_send_frag", "512", "-alpn", LONG_ALPN),
        NAME,
        tuple(c * 200 for c in "xyz"),
    ),
    "openssl_upper_dot": (openssl("-servername", "Hello.Example.COM."), NAME, ()),
    "curl": (curl(), NAME, ("h2", "http/1.1")),
    "curl_http11": (curl("--http1.1"), NAME, ("http/1.1",)),
    "python_ssl_sni": (python_ssl(NAME), NAME, ()),
    "python_ssl_alpn": (python_ssl(NAME, ["h2", "http/1.1"]), NAME, ("h2", "http/1.1")),
    "python_ssl_nosni": (python_ssl(None), None, ()),
}


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    only = set(argv[2:])
    for name, (client, _, _) in CLIENTS.items():
        if only and name not in only:
            continue
        data = capture(client)
        (out / f"{name}.bin").write_bytes(data)
        print(f"{name}: {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
