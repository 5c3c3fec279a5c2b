"""Real TLS (and plain TCP) backends on loopback, and the clients that talk to them.

Each backend has a name and answers a tiny line protocol once TLS is up, so a test learns which
backend a connection reached, under which SNI, and from which client address:

- `HELLO\\n`   -> `backend=<name> sni=<sni> alpn=<alpn> src=<ip>:<port> proxy=<v1|v2|->\\n`, close.
- `GET ...`    -> an HTTP/1.1 200 whose body is the same identity line (for curl), close.
- `SUM <m>\\n` -> read until the client shuts down writing, reply `sha256=<hex> n=<bytes>\\n`,
                 then stream `m` bytes of `pattern(m)`, close. Proves integrity and half-close.
- `WAIT\\n`    -> say nothing until the client goes away (for idle and drain tests).
- `ECHO\\n`    -> send back every byte until the client goes away (long-lived sessions).

With `proxy=True` the backend first reads a PROXY v1/v2 header (orama_stealth.wire.proxyproto.parse)
and reports the address it carries. TLS runs over a MemoryBIO so a client's TCP FIN never tears
down the server's sending side: the server keeps writing after the client has shut down writing,
which is exactly what the router must allow.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from orama_stealth.lab.pki import IssuedCert, TestCA
from orama_stealth.wire.proxyproto import ProxyHeader, parse

LOOPBACK = "127.0.0.1"
NAMES = (
    "example.test",
    "*.example.test",
    "*.cdn.example.test",
    "*.b.cdn.example.test",
    "localhost",
    "127.0.0.1",
    "::1",
)
_PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern(n: int) -> bytes:
    reps = n // len(_PATTERN) + 1
    return (_PATTERN * reps)[:n]


def client_hello(sni: str) -> bytes:
    """The bytes of a real ClientHello (Python's ssl) for `sni`, without a server."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@dataclass(frozen=True)
class Pki:
    ca: TestCA
    ca_file: Path
    cert: IssuedCert


def make_pki(directory: Path) -> Pki:
    ca = TestCA()
    directory.mkdir(parents=True, exist_ok=True)
    ca_file = ca.write_ca(directory / "ca.pem")
    return Pki(ca, ca_file, ca.issue(list(NAMES), directory, "backend"))


@dataclass
class Seen:
    """What a backend observed about one connection."""

    sni: str | None
    alpn: str | None
    peer: tuple[str, int]
    proxy: ProxyHeader | None
    command: str = ""


class _MemTLS:
    """Server-side TLS over a blocking socket through memory BIOs."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, leftover: bytes) -> None:
        self.sock = sock
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=True)
        if leftover:
            self.inc.write(leftover)
        self.eof = False

    def _flush(self) -> None:
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> bool:
        if self.eof:
            return False
        data = self.sock.recv(65536)
        if not data:
            self.eof = True  # TCP FIN: deliberately not told to OpenSSL, we may still send
            return False
        self.inc.write(data)
        return True

    def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionError("client closed during the TLS handshake") from None

    def recv(self, n: int = 65536) -> bytes:
        while True:
            try:
                data = self.obj.read(n)
                self._flush()
                return data
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        for i in range(0, len(view), 16384):
            self.obj.write(view[i : i + 16384])
            self._flush()

    def close(self) -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            self.obj.unwrap()
        with contextlib.suppress(OSError):
            self._flush()


class _Plain:
    def __init__(self, sock: socket.socket, leftover: bytes) -> None:
        self.sock, self.buf = sock, leftover

    def handshake(self) -> None:
        pass

    def recv(self, n: int = 65536) -> bytes:
        if self.buf:
            data, self.buf = self.buf, b""
            return data
        return self.sock.recv(n)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        pass


class Backend:
    """A threaded server on loopback; use as a context manager (or start()/close())."""

    def __init__(
        self,
        name: str,
        pki: Pki | None,
        *,
        proxy: bool = False,
        port: int = 0,
        host: str = LOOPBACK,
        record: bool = False,
    ) -> None:
        self.name = name
        self.proxy = proxy
        # record=True (plain only): keep every byte received until EOF, answer nothing.
        self.record = record
        self.received: list[bytes] = []
        self.tls = pki is not None
        self.host = host
        self.seen: list[Seen] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._snis: dict[int, str] = {}
        self._ctx: ssl.SSLContext | None = None
        if pki is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(pki.cert.cert_file, pki.cert.key_file)
            ctx.set_alpn_protocols(["http/1.1", "acme-tls/1"])
            ctx.sni_callback = self._on_sni
            self._ctx = ctx
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    @property
    def addr(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _on_sni(self, obj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: object) -> None:
        with self._lock:
            self._snis[id(obj)] = name or "-"

    def start(self) -> Backend:
        self._sock.listen(512)
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._sock.close()
        with self._lock:
            for c in list(self._conns):
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Backend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(60)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _read_proxy(self, conn: socket.socket) -> tuple[ProxyHeader, bytes]:
        buf = b""
        while True:
            got = parse(buf)
            if got is not None:
                return got[0], buf[got[1] :]
            chunk = conn.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed inside the PROXY header after {buf!r}")
            buf += chunk

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            with conn:
                self._session(conn, (peer[0], peer[1]))
        except Exception as e:  # a test backend reports, never crashes its thread silently
            with self._lock:
                self.errors.append(f"{type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._conns.discard(conn)

    def _session(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        header: ProxyHeader | None = None
        leftover = b""
        if self.proxy:
            header, leftover = self._read_proxy(conn)
        if self.record:
            data = leftover + recv_all(conn)
            with self._lock:
                self.received.append(data)
                self.seen.append(Seen(None, None, peer, header, "record"))
            return
        chan: _MemTLS | _Plain
        sni: str | None = None
        alpn: str | None = None
        if self._ctx is not None:
            tls = _MemTLS(conn, self._ctx, leftover)
            tls.handshake()
            with self._lock:
                sni = self._snis.pop(id(tls.obj), None)
            alpn = tls.obj.selected_alpn_protocol()
            chan = tls
        else:
            chan = _Plain(conn, leftover)
        line, rest = _read_line(chan)
        seen = Seen(sni, alpn, peer, header, line.split(" ", 1)[0])
        with self._lock:
            self.seen.append(seen)
        src = header.src if header is not None and header.src is not None else peer
        ident = (
            f"backend={self.name} sni={sni or '-'} alpn={alpn or '-'} src={src[0]}:{src[1]}"
            f" proxy={f'v{header.version}' if header else '-'}\n"
        ).encode()
        if line == "HELLO":
            chan.sendall(ident)
        elif line.startswith("GET "):
            while b"\r\n\r\n" not in rest:
                more = chan.recv()
                if not more:
                    break
                rest += more
            chan.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(ident)}\r\n\r\n".encode()
                + ident
            )
        elif line.startswith("SUM "):
            m = int(line.split()[1])
            h = hashlib.sha256(rest)
            n = len(rest)
            while True:
                data = chan.recv()
                if not data:
                    break
                h.update(data)
                n += len(data)
            chan.sendall(f"sha256={h.hexdigest()} n={n}\n".encode())
            chan.sendall(pattern(m))
        elif line == "WAIT":
            while chan.recv():
                pass
        elif line == "ECHO":
            # A long-lived session: every byte comes back, until the client goes.
            if rest:
                chan.sendall(rest)
            while data := chan.recv():
                chan.sendall(data)
        chan.close()

    def wait_seen(self, count: int, timeout: float = 10.0) -> list[Seen]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.seen) >= count:
                    return list(self.seen)
            time.sleep(0.02)
        raise TimeoutError(f"backend {self.name} saw {len(self.seen)} connections, not {count}")


def _read_line(chan: _MemTLS | _Plain, limit: int = 8192) -> tuple[str, bytes]:
    buf = b""
    while b"\n" not in buf:
        data = chan.recv()
        if not data:
            break
        buf += data
        if len(buf) > limit and b"\n" not in buf:
            raise ValueError("request line too long")
    line, _, rest = buf.partition(b"\n")
    return line.decode("ascii", "replace").rstrip("\r"), rest


@contextlib.contextmanager
def backends(pki: Pki | None, *names: str, proxy: bool = False) -> Iterator[dict[str, Backend]]:
    with serving({n: Backend(n, pki, proxy=proxy) for n in names}) as started:
        yield started


# ---- clients ---------------------------------------------------------------------------------


def client_context(pki: Pki, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


@contextlib.contextmanager
def tls_connect(
    port: int,
    sni: str | None,
    pki: Pki,
    *,
    host: str = LOOPBACK,
    alpn: list[str] | None = None,
    source: str | None = None,
    timeout: float = 15.0,
) -> Iterator[ssl.SSLSocket]:
    """A verified TLS connection through `host:port`, presenting `sni` (None: connect by IP)."""
    ctx = client_context(pki, alpn)
    if sni is None:
        ctx.check_hostname = False  # the certificate is still verified against the CA
    raw = socket.create_connection(
        (host, port), timeout=timeout, source_address=(source, 0) if source else None
    )
    try:
        s = ctx.wrap_socket(raw, server_hostname=sni)
    except BaseException:
        raw.close()
        raise
    with s:
        yield s


def recv_all(s: socket.socket, limit: int = 1 << 30) -> bytes:
    chunks = []
    n = 0
    while n < limit:
        try:
            data = s.recv(1 << 20)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError):
            break
        if not data:
            break
        chunks.append(data)
        n += len(data)
    return b"".join(chunks)


def parse_ident(line: bytes | str) -> dict[str, str]:
    text = line.decode() if isinstance(line, bytes) else line
    return dict(part.split("=", 1) for part in text.strip().splitlines()[-1].split())


def hello(
    port: int,
    sni: str | None,
    pki: Pki,
    *,
    alpn: list[str] | None = None,
    source: str | None = None,
    host: str = LOOPBACK,
) -> dict[str, str]:
    """Ask whoever answers behind `port` for its identity line."""
    with tls_connect(port, sni, pki, alpn=alpn, source=source, host=host) as s:
        s.sendall(b"HELLO\n")
        return parse_ident(recv_all(s))


def shutdown_write(s: socket.socket) -> None:
    """TCP half-close under TLS: FIN without close_notify; the session stays readable."""
    socket.socket.shutdown(s, socket.SHUT_WR)


def checksum_transfer(
    s: socket.socket,
    upload: int,
    download: int,
    chunk: int = 1 << 16,
    pace: float = 0.0,
) -> tuple[bool, bool]:
    """Run SUM over `s`: (backend's sha256 of what we sent matches, we got the exact pattern)."""
    s.sendall(f"SUM {download}\n".encode())
    data = pattern(upload)
    h = hashlib.sha256(data).hexdigest()
    for i in range(0, upload, chunk):
        s.sendall(data[i : i + chunk])
        if pace:
            time.sleep(pace)
    shutdown_write(s)
    reply = recv_all(s)
    head, _, body = reply.partition(b"\n")
    return head == f"sha256={h} n={upload}".encode(), body == pattern(download)


@contextlib.contextmanager
def serving(made: dict[str, Backend]) -> Iterator[dict[str, Backend]]:
    """Start every backend; close them all afterwards, even when a start or a test fails."""
    try:
        for b in made.values():
            b.start()
        yield made
    finally:
        for b in made.values():
            b.close()
