"""The router process from outside: socket activation, sd_notify, drain, reload, restarts, limits.

Backends are small threaded TCP servers that say their name and then echo. Clients either send
plain bytes (with `non_tls: fallback`, so they reach the fallback) or a real ClientHello made by
Python's ssl module over a MemoryBIO, so SNI routing is exercised without finishing a handshake.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.procs import free_port, stop
from support.tls_backends import client_hello

LOOPBACK = "127.0.0.1"


# --- backends and clients ---------------------------------------------------------------------


class TagServer:
    """Says `<name>\\n` on every connection, then echoes until the client goes."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.sendall(f"{self.name}\n".encode())
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


@contextlib.contextmanager
def tag_server(name: str, port: int = 0) -> Iterator[TagServer]:
    srv = TagServer(name, port)
    try:
        yield srv
    finally:
        srv.close()


def read_line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        data = s.recv(1)
        if not data:
            break
        buf += data
    return buf


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = s.recv(n - len(buf))
        if not data:
            break
        buf += data
    return buf


def connect(port: int, first: bytes, timeout: float = 10.0) -> tuple[socket.socket, bytes]:
    """Connect, send `first`, return the socket and the backend's tag line."""
    s = socket.create_connection((LOOPBACK, port), timeout=timeout)
    s.sendall(first)
    return s, read_line(s)


def which_backend(port: int, sni: str) -> str:
    s, tag = connect(port, client_hello(sni))
    s.close()
    return tag.decode().strip()


def closed_by_peer(s: socket.socket, limit: int = 1 << 20) -> bool:
    """True once the peer closes (reading past whatever was still queued), False on timeout."""
    try:
        while limit > 0:
            data = s.recv(65536)
            if not data:
                return True
            limit -= len(data)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


# --- the router process -----------------------------------------------------------------------


class Router:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, config: Path, port: int) -> None:
        self.proc, self.log, self.config, self.port = proc, log, config, port

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if len(re.findall(pattern, text)) >= count:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in router log:\n{text[-3000:]}")
            if self.proc.poll() is not None and len(re.findall(pattern, self.text())) < count:
                raise AssertionError(f"router exited ({self.proc.returncode}):\n{text[-3000:]}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def workers(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()]


def config_yaml(port: int, fallback: int, routes: dict[str, int] | None = None,
                **options: object) -> str:
    lines = [f'listen: "{LOOPBACK}:{port}"', "non_tls: fallback"]
    lines += [f"{k}: {v}" for k, v in options.items()]
    lines.append(f'fallback: {{name: fb, addr: "{LOOPBACK}:{fallback}"}}')
    if routes:
        lines.append("routes:")
        for match, bport in routes.items():
            lines.append(f'  - match: "{match}"')
            lines.append(f'    backend: {{name: "be-{bport}", addr: "{LOOPBACK}:{bport}"}}')
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def router(
    tmp_path: Path, text: str, port: int, *, env: dict[str, str] | None = None,
    argv_prefix: list[str] | None = None, stdin: object = subprocess.DEVNULL,
    wait_ready: bool = True,
) -> Iterator[Router]:
    d = tmp_path / f"router-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    config, log = d / "sni-router.yaml", d / "router.log"
    config.write_text(text)
    argv = [*(argv_prefix or []), sys.executable, "-m", "orama_stealth.router.cli", "--config",
            str(config)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=stdin,
                                env={**os.environ, **(env or {})})
    r = Router(proc, log, config, port)
    try:
        if wait_ready:
            r.wait_log("event=ready")
        yield r
    finally:
        stop(proc)


# --- tests ------------------------------------------------------------------------------------


def test_check_prints_the_table_and_rejects_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(config_yaml(443, 8443, {"cdn.example.com": 5349}))
    out = subprocess.run([sys.executable, "-m", "orama_stealth.router.cli", "check", "--config",
                          str(good)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.search(r"cdn\.example\.com\s+-> be-5349 127\.0\.0\.1:5349", out.stdout)
    assert re.search(r"\*\s+-> fb 127\.0\.0\.1:8443", out.stdout)
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("non_tls: fallback", "non_tls: maybe"))
    out = subprocess.run([sys.executable, "-m", "orama_stealth.router.cli", "check", "--config",
                          str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().startswith(f"{bad}:2: non_tls: ")


def test_a_busy_port_is_a_clear_start_failure(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "r.yaml"
        cfg.write_text(config_yaml(port, free_port()))
        out = subprocess.run(
            [sys.executable, "-m", "orama_stealth.router.cli", "--config", str(cfg)],
            capture_output=True, text=True, timeout=60,
        )
    assert out.returncode == 1
    assert "event=start_failed" in out.stderr and f"127.0.0.1:{port}" in out.stderr


def test_inherited_listen_fd_is_used_instead_of_binding(tmp_path: Path) -> None:
    with tag_server("fallback") as fb, socket.socket() as lsock:
        lsock.bind((LOOPBACK, 0))
        lsock.listen(16)
        port = lsock.getsockname()[1]
        configured = free_port()
        # systemd passes the socket as fd 3 and sets LISTEN_PID to the service's own PID.
        wrapper = ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=https exec "$@" 3<&0',
                   "sh"]
        with router(tmp_path, config_yaml(configured, fb.port), configured,
                    argv_prefix=wrapper, stdin=lsock) as r:
            lsock.close()  # the router holds its own copy now
            s, tag = connect(port, b"plain bytes\n")
            with s:
                assert tag == b"fallback\n"
                assert read_line(s) == b"plain bytes\n"
            assert "how=inherited" in r.text()
            with pytest.raises(OSError):
                socket.create_connection((LOOPBACK, configured), timeout=2).close()


def test_sd_notify_ready_reloading_stopping(tmp_path: Path) -> None:
    name = f"orama-test-{uuid.uuid4().hex}"
    with tag_server("fallback") as fb, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind("\0" + name)
        ns.settimeout(15)
        port = free_port()
        with router(tmp_path, config_yaml(port, fb.port, workers=2), port,
                    env={"NOTIFY_SOCKET": "@" + name}) as r:
            ready = ns.recv(4096).decode()
            assert "READY=1" in ready.splitlines()
            r.signal(signal.SIGHUP)
            reloading = ns.recv(4096).decode().splitlines()
            assert "RELOADING=1" in reloading
            assert any(re.fullmatch(r"MONOTONIC_USEC=\d+", x) for x in reloading)
            assert "READY=1" in ns.recv(4096).decode().splitlines()
            r.signal(signal.SIGTERM)
            assert "STOPPING=1" in ns.recv(4096).decode().splitlines()
            assert r.proc.wait(30) == 0


def test_drain_serves_live_connections_until_drain_timeout(tmp_path: Path) -> None:
    with tag_server("fallback") as fb:
        port = free_port()
        with router(tmp_path, config_yaml(port, fb.port, drain_timeout="1500ms"), port) as r:
            s, tag = connect(port, b"x\n")
            with s:
                assert tag == b"fallback\n" and read_line(s) == b"x\n"
                r.signal(signal.SIGTERM)
                r.wait_log("event=worker_draining")
                # The live connection keeps working while the router drains...
                s.sendall(b"still here\n")
                assert read_line(s) == b"still here\n"
                # ...new ones are not accepted...
                with pytest.raises(OSError):
                    socket.create_connection((LOOPBACK, port), timeout=2).close()
                # ...and at drain_timeout the router closes it and exits 0.
                assert closed_by_peer(s)
            assert r.proc.wait(30) == 0
            assert "event=drain_timeout" in r.text()


def test_drain_ends_as_soon_as_the_last_connection_closes(tmp_path: Path) -> None:
    with tag_server("fallback") as fb:
        port = free_port()
        with router(tmp_path, config_yaml(port, fb.port, drain_timeout="5m"), port) as r:
            s, _tag = connect(port, b"x\n")
            r.signal(signal.SIGTERM)
            r.wait_log("event=worker_draining")
            assert r.proc.poll() is None
            s.close()
            # Far below the 5 minute drain_timeout: the router noticed nothing is left.
            assert r.proc.wait(30) == 0
            assert "event=drain_timeout" not in r.text()


def test_reload_swaps_routes_keeps_live_connections_and_rejects_bad_files(
    tmp_path: Path,
) -> None:
    with tag_server("A") as a, tag_server("B") as b, tag_server("fallback") as fb:
        port = free_port()
        with router(tmp_path, config_yaml(port, fb.port, {"cdn.example.test": a.port},
                                          workers=2), port) as r:
            assert which_backend(port, "cdn.example.test") == "A"
            hello = client_hello("cdn.example.test")
            live, tag = connect(port, hello)
            with live:
                assert tag == b"A\n"
                assert recv_exact(live, len(hello)) == hello  # replayed, then echoed back
                r.config.write_text(config_yaml(port, fb.port, {"cdn.example.test": b.port},
                                                workers=2))
                r.signal(signal.SIGHUP)
                r.wait_log("event=reloaded")
                deadline = time.monotonic() + 10
                while which_backend(port, "cdn.example.test") != "B":
                    assert time.monotonic() < deadline, "workers never switched to B"
                # Both workers got the new table: every new connection goes to B now.
                assert {which_backend(port, "cdn.example.test") for _ in range(8)} == {"B"}
                live.sendall(b"after reload\n")
                assert read_line(live) == b"after reload\n"

                r.config.write_text("fallback: {name: x, addr: nowhere}\n")
                r.signal(signal.SIGHUP)
                text = r.wait_log("event=reload_failed")
                assert re.search(r'error="[^"]*sni-router\.yaml:1: fallback\.addr: expected', text)
                assert which_backend(port, "cdn.example.test") == "B"


def test_per_ip_cap_across_workers_and_worker_restart_frees_slots(tmp_path: Path) -> None:
    with tag_server("fallback") as fb:
        port = free_port()
        metrics = free_port()
        text = config_yaml(port, fb.port, workers=2, max_conns_per_ip=2,
                           metrics_listen=f'"{LOOPBACK}:{metrics}"')
        with router(tmp_path, text, port) as r:
            held = [connect(port, b"x\n")[0] for _ in range(2)]
            try:
                for _ in range(3):
                    s = socket.create_connection((LOOPBACK, port), timeout=10)
                    with s:
                        # A first byte, or TCP_DEFER_ACCEPT holds the connection in the kernel
                        # (about 7 s here) before the router ever sees it to refuse it.
                        s.sendall(b"z\n")
                        assert closed_by_peer(s)
                text = r.wait_log("Connection limit reached")
                assert re.search(r"event=conn_limit .*limit=per_ip", text)
                _wait_metric(metrics, 'limit_refusals_total{limit="per_ip"} 3')
                # Kill every worker: what they held must be released by the supervisor.
                old = r.workers()
                for pid in old:
                    os.kill(pid, signal.SIGKILL)
                for s in held:
                    assert closed_by_peer(s)
            finally:
                for s in held:
                    s.close()
            r.wait_log("event=worker_exited", count=2)
            deadline = time.monotonic() + 20
            while len(set(r.workers()) - set(old)) < 2:
                assert time.monotonic() < deadline, "workers were not restarted"
                time.sleep(0.05)
            again = []
            try:
                for _ in range(2):
                    s, tag = connect(port, b"y\n")
                    again.append(s)
                    assert tag == b"fallback\n"
            finally:
                for s in again:
                    s.close()
            body = _get(metrics, "/metrics")
            # Counters of the killed workers are kept: no reset seen by Prometheus.
            assert 'limit_refusals_total{limit="per_ip"} 3\n' in body
            assert "orama_sni_router_worker_restarts_total 2" in body


def _wait_metric(port: int, sample: str) -> None:
    deadline = time.monotonic() + 10
    while sample + "\n" not in (body := _get(port, "/metrics")):
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def _get(port: int, path: str) -> str:
    with socket.create_connection((LOOPBACK, port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode()


def test_dial_retries_a_refused_backend_until_it_listens(tmp_path: Path) -> None:
    backend_port = free_port()
    port = free_port()
    text = config_yaml(port, backend_port, backend_dial_timeout="10s")
    with router(tmp_path, text, port) as r:
        s = socket.create_connection((LOOPBACK, port), timeout=15)
        with s:
            s.sendall(b"early\n")
            time.sleep(0.5)  # the router is being refused meanwhile
            with tag_server("late", backend_port):
                assert read_line(s) == b"late\n"
                assert read_line(s) == b"early\n"
        assert "backend dial failed" not in r.text()


def test_dial_failure_and_hello_timeout_are_logged(tmp_path: Path) -> None:
    port = free_port()
    text = config_yaml(port, free_port(), backend_dial_timeout="300ms",
                       client_hello_timeout="300ms")
    text = text.replace("non_tls: fallback\n", "")
    gone = f"{LOOPBACK}:{free_port()}"
    routes = f'routes:\n  - match: "x.test"\n    backend: {{name: gone, addr: "{gone}"}}\n'
    with router(tmp_path, text + routes, port) as r:
        with socket.create_connection((LOOPBACK, port), timeout=15) as s:
            s.sendall(client_hello("x.test"))
            assert closed_by_peer(s)
        log = r.wait_log("backend dial failed")
        assert re.search(r'event=dial_failed msg="backend dial failed" .*backend=gone', log)
        with socket.create_connection((LOOPBACK, port), timeout=15) as s:
            assert closed_by_peer(s)  # said nothing: closed at client_hello_timeout
        log = r.wait_log("reason=timeout")
        assert re.search(r'msg="ClientHello peek failed" .*reason=timeout', log)
        with socket.create_connection((LOOPBACK, port), timeout=15) as s:
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert closed_by_peer(s)  # non_tls: drop is the default
        r.wait_log("reason=not_tls")


def test_idle_connections_are_closed_after_idle_timeout(tmp_path: Path) -> None:
    with tag_server("fallback") as fb:
        port = free_port()
        with router(tmp_path, config_yaml(port, fb.port, idle_timeout="400ms"), port):
            s, tag = connect(port, b"x\n")
            with s:
                assert tag == b"fallback\n"
                assert read_line(s) == b"x\n"
                assert closed_by_peer(s)


def test_listen_port_only_is_dual_stack(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this build")
    with tag_server("fallback") as fb:
        # A wildcard bind collides with the port on any address (a lab link's SSH client
        # ports too), so the port is picked by a dual-stack wildcard bind like the router's;
        # other suites share this machine, so a port taken meanwhile is retried.
        for attempt in range(5):
            port = free_port("::")
            text = config_yaml(port, fb.port).replace(f'"{LOOPBACK}:{port}"', f'":{port}"')
            try:
                with router(tmp_path, text, port) as r:
                    assert re.search(rf"socket=\[::\]:{port} how=bound", r.text())
                    for host in (LOOPBACK, "::1"):
                        with socket.create_connection((host, port), timeout=10) as s:
                            s.sendall(b"hi\n")
                            assert read_line(s) == b"fallback\n"
                return
            except AssertionError as e:
                if "Address already in use" not in str(e) or attempt == 4:
                    raise


def test_sigusr1_logs_a_counters_snapshot(tmp_path: Path) -> None:
    with tag_server("fallback") as fb:
        port = free_port()
        with router(tmp_path, config_yaml(port, fb.port, workers=2), port) as r:
            for _ in range(3):
                s, tag = connect(port, b"x\n")
                s.close()
                assert tag == b"fallback\n"
            deadline = time.monotonic() + 10
            while True:
                r.signal(signal.SIGUSR1)
                time.sleep(0.3)
                lines = [x for x in r.text().splitlines() if "event=stats" in x]
                if lines and "conns.fb=3 " in lines[-1]:
                    break
                assert time.monotonic() < deadline, lines
            assert 'msg="counters snapshot"' in lines[-1] and "workers=2" in lines[-1]


class HoldServer:
    """Says its name, reads until the client's FIN, then keeps its own side open and silent."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.got_eof = threading.Event()
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            self.held.append(conn)
            conn.sendall(b"hold\n")
            while conn.recv(65536):
                pass
            self.got_eof.set()

    def close(self) -> None:
        for conn in self.held:
            conn.close()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


def test_half_closed_connection_is_closed_after_half_close_timeout(tmp_path: Path) -> None:
    hold = HoldServer()
    try:
        port = free_port()
        # Drain would wait 60s for this connection; the half-close timeout ends it first.
        text = config_yaml(port, hold.port, half_close_timeout="500ms", drain_timeout="60s")
        with router(tmp_path, text, port) as r:
            s, tag = connect(port, b"bye\n", timeout=20)
            with s:
                assert tag == b"hold\n"
                s.shutdown(socket.SHUT_WR)
                assert hold.got_eof.wait(10)  # the FIN was passed on as shutdown(SHUT_WR)
                # Within the socket's 20 s timeout: not the 60 s drain or 10 min idle timeout.
                assert closed_by_peer(s)
            log = r.wait_log("event=half_close_timeout")
            assert re.search(
                r'msg="half-closed connection timed out" .*finished=client waiting_for=backend '
                r"timeout=0.5 backend=fb", log
            ), log
            # Nothing left to drain: SIGTERM ends the router at once.
            r.signal(signal.SIGTERM)
            r.proc.wait(20)
            assert r.proc.returncode == 0
            assert "event=drain_timeout" not in r.text()
    finally:
        hold.close()


def test_stop_after_turn_probes_does_not_wait_for_drain_timeout(tmp_path: Path) -> None:
    """TLS and TURN probes through the router to a real coturn, then SIGTERM: every connection
    the probes made is finished on both sides, so nothing may be left to drain. (Under uvloop
    the backend's close after a client's FIN used to go unseen, and the stop waited out the
    whole drain_timeout with closed=1 or more.)"""
    from support.servers import coturn

    from orama_stealth.lab.pki import TestCA
    from orama_stealth.probe.model import ProbeSpec
    from orama_stealth.probe.runner import run_probe

    sni = "cdn.example.test"
    with coturn(tmp_path, TestCA(), names=(sni, LOOPBACK)) as turn:
        port = free_port()
        text = config_yaml(port, free_port(), {sni: turn.tls_port}, drain_timeout="60s",
                           workers=1)
        with router(tmp_path, text, port) as r:
            for extra in ({"turn": True, "turn_secret": turn.secret}, {}, {"turn": True,
                          "turn_secret": turn.secret}):
                report = run_probe(ProbeSpec(LOOPBACK, port, sni=sni, ca_file=str(turn.ca_file),
                                             timeout=5.0, **extra))  # type: ignore[arg-type]
                assert report.ok, report
            time.sleep(0.5)  # let the last closes reach the router (fewer than one sweep)
            r.signal(signal.SIGTERM)
            r.proc.wait(30)  # far below drain_timeout
            assert r.proc.returncode == 0
            assert "event=drain_timeout" not in r.text(), r.text()[-2000:]
