"""Acceptance: reload under traffic, bad reloads, draining stop, backend dials, non-TLS input."""

from __future__ import annotations

import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.procs import free_port
from support.router import Router, config_text, router
from support.tls_backends import (
    Backend,
    Pki,
    checksum_transfer,
    hello,
    parse_ident,
    recv_all,
    serving,
    tls_connect,
)


@pytest.fixture(scope="module")
def farm(pki: Pki) -> Iterator[dict[str, Backend]]:
    made = {n: Backend(n, pki) for n in ("caddy", "turn", "turn2")}
    made["plain"] = Backend("plain", None)
    with serving(made):
        yield made


class SlowTransfer:
    """A checksummed upload paced over a few seconds, run in a thread."""

    def __init__(self, port: int, pki: Pki, sni: str = "cdn.example.test") -> None:
        self.result: tuple[bool, bool] | None = None
        self.error: BaseException | None = None
        self.started = threading.Event()
        self._t = threading.Thread(target=self._run, args=(port, pki, sni), daemon=True)
        self._t.start()
        assert self.started.wait(15), "slow transfer never connected"

    def _run(self, port: int, pki: Pki, sni: str) -> None:
        try:
            with tls_connect(port, sni, pki, timeout=30) as s:
                self.started.set()
                # 30 chunks, 0.1s apart: about 3s in flight.
                self.result = checksum_transfer(
                    s, upload=30 * 32768, download=2 << 20, chunk=32768, pace=0.1
                )
        except BaseException as e:
            self.error = e
            self.started.set()

    def join(self) -> tuple[bool, bool]:
        self._t.join(60)
        assert self.error is None, f"in-flight transfer failed: {self.error!r}"
        assert self.result is not None, "in-flight transfer did not finish"
        return self.result


def _conf(r: Router, routes: list[tuple[str, tuple[str, str]]], fallback: Backend) -> str:
    return config_text(
        r.port, routes, ("caddy", fallback.addr), r.metrics_port, workers=2, drain_timeout="10s"
    )


def test_sighup_under_traffic_keeps_live_connections_and_applies_new_routes(
    tmp_path: Path, pki: Pki, farm: dict[str, Backend]
) -> None:
    routes = [("cdn.example.test", ("turn", farm["turn"].addr))]
    with router(
        tmp_path,
        routes=routes,
        fallback=("caddy", farm["caddy"].addr),
        workers=2,
        drain_timeout="10s",
    ) as r:
        assert hello(r.port, "cdn.example.test", pki)["backend"] == "turn"
        transfer = SlowTransfer(r.port, pki)
        assert transfer.result is None, "the transfer must still be in flight at the reload"
        r.write_config(
            _conf(r, [("cdn.example.test", ("turn2", farm["turn2"].addr))], farm["caddy"])
        )
        r.hup()
        r.wait_log(r"event=reloaded")
        # Every worker has the new table (several tries land on both workers).
        deadline = time.monotonic() + 10
        seen: set[str] = set()
        while time.monotonic() < deadline and seen != {"turn2"}:
            seen = {hello(r.port, "cdn.example.test", pki)["backend"] for _ in range(6)}
        assert seen == {"turn2"}
        assert transfer.join() == (True, True)
        assert r.wait_metric("reloads_total", 1.0) == 1.0


def test_invalid_config_on_sighup_is_rejected_and_old_routes_serve(
    tmp_path: Path, pki: Pki, farm: dict[str, Backend]
) -> None:
    routes = [("cdn.example.test", ("turn", farm["turn"].addr))]
    with router(tmp_path, routes=routes, fallback=("caddy", farm["caddy"].addr), workers=2) as r:
        good = r.config.read_text()
        r.write_config(good.replace(farm["turn"].addr, "not-an-address"))
        r.hup()
        line = r.wait_log(r"event=reload_failed")
        assert "sni-router.yaml:" in line and "addr" in line
        for _ in range(4):
            assert hello(r.port, "cdn.example.test", pki)["backend"] == "turn"
        assert r.wait_metric("reload_failures_total", 1.0) == 1.0
        assert r.proc.poll() is None


def test_sigterm_drains_a_live_transfer_and_refuses_new_connections(
    tmp_path: Path, pki: Pki, farm: dict[str, Backend]
) -> None:
    routes = [("cdn.example.test", ("turn", farm["turn"].addr))]
    with router(
        tmp_path,
        routes=routes,
        fallback=("caddy", farm["caddy"].addr),
        workers=2,
        drain_timeout="15s",
    ) as r:
        transfer = SlowTransfer(r.port, pki)
        time.sleep(0.3)  # the transfer is under way, not just connected
        assert transfer.result is None, "the transfer must still be in flight at SIGTERM"
        r.term()
        r.wait_log(r"event=draining")
        # New connections are refused while the old one drains.
        deadline = time.monotonic() + 10
        refused = False
        while time.monotonic() < deadline and not refused:
            try:
                with socket.create_connection(("127.0.0.1", r.port), timeout=2):
                    time.sleep(0.05)
            except OSError:
                refused = True
        assert refused, "router still accepted connections after SIGTERM"
        assert transfer.join() == (True, True)
        assert r.proc.wait(20) == 0


def test_backend_that_comes_up_within_dial_timeout_gets_the_connection(
    tmp_path: Path, pki: Pki, farm: dict[str, Backend]
) -> None:
    port = free_port()
    routes = [("late.example.test", ("late", f"127.0.0.1:{port}"))]
    with router(
        tmp_path,
        routes=routes,
        fallback=("caddy", farm["caddy"].addr),
        workers=1,
        backend_dial_timeout="8s",
    ) as r:
        result: dict[str, str] = {}

        def client() -> None:
            result.update(hello(r.port, "late.example.test", pki))

        t = threading.Thread(target=client, daemon=True)
        t.start()
        time.sleep(1.0)  # the first dials are refused
        with Backend("late", pki, port=port):
            t.join(20)
        assert result.get("backend") == "late"


def test_backend_that_never_comes_is_logged(
    tmp_path: Path, pki: Pki, farm: dict[str, Backend]
) -> None:
    routes = [("gone.example.test", ("gone", f"127.0.0.1:{free_port()}"))]
    with router(
        tmp_path,
        routes=routes,
        fallback=("caddy", farm["caddy"].addr),
        workers=1,
        backend_dial_timeout="500ms",
    ) as r:
        with pytest.raises((OSError, ssl.SSLError)):
            hello(r.port, "gone.example.test", pki)
        line = r.wait_log(r"backend dial failed")
        assert "backend=gone" in line
        assert r.wait_metric('dial_failures_total{backend="gone"}', 1.0) == 1.0


def test_non_tls_dropped_by_default(tmp_path: Path, farm: dict[str, Backend]) -> None:
    plain = farm["plain"]
    with router(tmp_path, routes=[], fallback=("plain", plain.addr), workers=1) as r:
        before = len(plain.seen)
        with socket.create_connection(("127.0.0.1", r.port), timeout=20) as s:
            s.sendall(b"HELLO\n")
            assert recv_all(s) == b""
        line = r.wait_log(r"ClientHello peek failed")
        assert "not_tls" in line
        assert len(plain.seen) == before


def test_non_tls_fallback_sends_plain_bytes_to_the_fallback(
    tmp_path: Path, farm: dict[str, Backend]
) -> None:
    plain = farm["plain"]
    with (
        router(
            tmp_path, routes=[], fallback=("plain", plain.addr), workers=1, non_tls="fallback"
        ) as r,
        socket.create_connection(("127.0.0.1", r.port), timeout=20) as s,
    ):
        s.sendall(b"HELLO\n")
        assert parse_ident(recv_all(s))["backend"] == "plain"


def test_sigusr1_logs_a_counters_snapshot(
    tmp_path: Path, pki: Pki, farm: dict[str, Backend]
) -> None:
    routes = [("cdn.example.test", ("turn", farm["turn"].addr))]
    with router(tmp_path, routes=routes, fallback=("caddy", farm["caddy"].addr), workers=2) as r:
        assert hello(r.port, "cdn.example.test", pki)["backend"] == "turn"
        r.settled_metric('connections_total{backend="turn"}')
        r.signal(signal.SIGUSR1)
        line = r.wait_log(r"event=stats")
        assert "counters snapshot" in line
        assert r.proc.poll() is None


def test_reload_applies_a_new_per_ip_cap(
    tmp_path: Path, pki: Pki, farm: dict[str, Backend]
) -> None:
    routes = [("cdn.example.test", ("turn", farm["turn"].addr))]
    with (
        router(
            tmp_path,
            routes=routes,
            fallback=("caddy", farm["caddy"].addr),
            workers=2,
            max_conns_per_ip=3,
        ) as r,
        tls_connect(r.port, "cdn.example.test", pki, source="127.0.0.71") as parked,
    ):
        parked.sendall(b"WAIT\n")
        assert hello(r.port, "cdn.example.test", pki, source="127.0.0.71")["backend"] == "turn"
        r.write_config(r.config.read_text().replace("max_conns_per_ip: 3", "max_conns_per_ip: 1"))
        r.hup()
        r.wait_log(r"event=reloaded")
        # Workers take the new config a moment after the supervisor logs it.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                hello(r.port, "cdn.example.test", pki, source="127.0.0.71")
            except (OSError, ssl.SSLError, ValueError, IndexError):
                break
            time.sleep(0.1)
        # The parked connection holds this address's only slot now, on whichever worker: every
        # new try from it is refused, other addresses still pass.
        for _ in range(4):
            with pytest.raises((OSError, ssl.SSLError, ValueError, IndexError)):
                hello(r.port, "cdn.example.test", pki, source="127.0.0.71")
        assert hello(r.port, "cdn.example.test", pki, source="127.0.0.72")["backend"] == "turn"
