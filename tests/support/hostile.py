"""Hostile clients and the means to watch a process from outside, for the router's tests.

- `attackers(port, conns, seconds)`: a separate process (so its work never competes with the
  test's own clients for one interpreter) holding `conns` connections that each sent the first
  byte of a TLS record and then stall, and re-opening every connection the other side closes,
  until `seconds` have passed. It reports what it did as one JSON line.
- `client_hello(sni)`: the bytes of a real ClientHello, for clients that never finish TLS.
- `Sink`: a TCP listener that completes connections but never reads them (a stuck backend).
- `worker_pids`, `fd_count`, `cpu_seconds`: /proc views of a process tree.
- `echo_conns`, `echoes`, `handshake`: the legitimate clients (TLS to the test backends).

Run directly: `python -m support.hostile PORT CONNS SECONDS` (what `attackers` starts).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from support.tls_backends import Pki, tls_connect

LOOPBACK = "127.0.0.1"
NAME = "cdn.example.test"  # routed to a TLS test backend
FIRST_BYTE = b"\x16"  # a TLS handshake record starts so; the rest never comes


def _attack(port: int, conns: int, seconds: float) -> dict[str, int]:
    sel = selectors.DefaultSelector()
    stats = {"opened": 0, "closed_by_peer": 0, "connect_failed": 0, "max_held": 0}
    held = 0

    def open_one() -> None:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((LOOPBACK, port))
        stats["opened"] += 1
        sel.register(s, selectors.EVENT_WRITE, False)

    for _ in range(conns):
        open_one()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key, _ev in sel.select(0.1):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            if not key.data:  # connecting
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    stats["connect_failed"] += 1
                    sel.unregister(s)
                    s.close()
                    open_one()
                    continue
                try:
                    s.send(FIRST_BYTE)
                except OSError:
                    stats["connect_failed"] += 1
                    sel.unregister(s)
                    s.close()
                    open_one()
                    continue
                sel.modify(s, selectors.EVENT_READ, True)
                held += 1
                stats["max_held"] = max(stats["max_held"], held)
                continue
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if data:
                continue
            stats["closed_by_peer"] += 1
            held -= 1
            sel.unregister(s)
            s.close()
            open_one()
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return stats


@contextlib.contextmanager
def attackers(port: int, conns: int, seconds: float) -> Iterator[subprocess.Popen[bytes]]:
    """Start the attack; the caller reads `report(proc)` once it is over. Always stopped."""
    tests_dir = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = tests_dir + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "support.hostile", str(port), str(conns), str(seconds)],
        stdout=subprocess.PIPE, env=env,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def report(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> dict[str, int]:
    out, _err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"attacker exited {proc.returncode}"
    got = json.loads(out.decode().strip().splitlines()[-1])
    assert isinstance(got, dict)
    return {str(k): int(v) for k, v in got.items()}


class Sink:
    """A backend that is stuck: the kernel completes its connections (a large backlog), and
    nothing ever accepts or reads them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(1024)
        self.port = int(self.sock.getsockname()[1])

    @property
    def addr(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def worker_pids(supervisor: int) -> list[int]:
    """The router's workers: the supervisor's children."""
    path = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    with contextlib.suppress(OSError):
        return [int(p) for p in path.read_text().split()]
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == supervisor:
                    out.append(int(entry.name))
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes, in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / tick


def echoes(s: ssl.SSLSocket, n: int) -> bool:
    msg = f"ping {n}\n".encode()
    try:
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            data = s.recv(len(msg) - len(got))
            if not data:
                return False
            got += data
    except (OSError, ssl.SSLError):
        return False
    return got == msg


@contextlib.contextmanager
def echo_conns(port: int, pki: Pki, n: int) -> Iterator[list[ssl.SSLSocket]]:
    with contextlib.ExitStack() as stack:
        socks = []
        for _ in range(n):
            s = stack.enter_context(tls_connect(port, NAME, pki, timeout=10))
            s.sendall(b"ECHO\n")
            assert echoes(s, 0)
            socks.append(s)
        yield socks


def wait_for(check: object, timeout: float, step: float = 0.05) -> bool:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return bool(check())


def handshake(port: int, pki: Pki, timeout: float) -> tuple[bool, float]:
    """One new legitimate TLS client through the router: (completed, seconds it took)."""
    t0 = time.monotonic()
    try:
        with tls_connect(port, NAME, pki, timeout=timeout):
            return True, time.monotonic() - t0
    except (OSError, ssl.SSLError):
        return False, time.monotonic() - t0


if __name__ == "__main__":
    result = _attack(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
    print(json.dumps(result), flush=True)
