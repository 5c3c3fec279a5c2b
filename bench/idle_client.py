"""W4 client process: open N TLS connections through a target, then hold them idle.

Runs as `python3 -m bench.idle_client HOST PORT SNI CAFILE COUNT MAX_SECONDS`. Plain
non-blocking sockets and a selector keep the client's own memory small, so one process can
hold thousands. It talks to the harness over stdin/stdout, one line each way:
  stdout `ready HELD FAILED` once every handshake finished (or the deadline passed);
  stdin `check` -> stdout `alive N` (connections the peer has not closed);
  stdin `close` or EOF -> close everything and exit.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import struct
import sys
import time

_TCP_ESTABLISHED = 1
_WINDOW = 64  # handshakes in flight at once


def _open(
    host: str, port: int, sni: str, ctx: ssl.SSLContext, count: int, max_seconds: float
) -> tuple[list[ssl.SSLSocket], int]:
    sel = selectors.DefaultSelector()
    done: list[ssl.SSLSocket] = []
    failed = 0
    started = 0
    pending = 0
    deadline = time.monotonic() + max_seconds

    def launch() -> None:
        nonlocal started, pending
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setblocking(False)
        raw.connect_ex((host, port))
        tls = ctx.wrap_socket(raw, server_hostname=sni, do_handshake_on_connect=False)
        sel.register(tls, selectors.EVENT_WRITE)
        started += 1
        pending += 1

    while (started < count or pending) and time.monotonic() < deadline:
        while started < count and pending < _WINDOW:
            launch()
        for key, _ in sel.select(timeout=0.5):
            tls = key.fileobj
            assert isinstance(tls, ssl.SSLSocket)
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                sel.modify(tls, selectors.EVENT_READ)
                continue
            except ssl.SSLWantWriteError:
                sel.modify(tls, selectors.EVENT_WRITE)
                continue
            except OSError:
                sel.unregister(tls)
                tls.close()
                pending -= 1
                failed += 1
                continue
            sel.unregister(tls)
            pending -= 1
            done.append(tls)
    for key in list(sel.get_map().values()):
        sel.unregister(key.fileobj)
        key.fileobj.close()  # type: ignore[union-attr]
        failed += 1
    sel.close()
    failed += count - started
    return done, failed


def _alive(conns: list[ssl.SSLSocket]) -> int:
    n = 0
    for c in conns:
        try:
            info = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        except OSError:
            continue
        # First byte of struct tcp_info is the TCP state; a peer close moves it to CLOSE_WAIT.
        if struct.unpack_from("B", info)[0] == _TCP_ESTABLISHED:
            n += 1
    return n


def main(argv: list[str]) -> int:
    host, port, sni, cafile, count, max_seconds = argv
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    conns, failed = _open(host, int(port), sni, ctx, int(count), float(max_seconds))
    print(f"ready {len(conns)} {failed}", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "check":
            print(f"alive {_alive(conns)}", flush=True)
        elif cmd == "close":
            break
    for c in conns:
        c.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
