"""Counters: publishing through shared memory across a fork, summing, Prometheus text."""

from __future__ import annotations

import os
import re

from orama_stealth.router.metrics import Stats, StatsRegion, merge, render


def test_worker_slots_are_read_back_across_fork_and_summed() -> None:
    region = StatsRegion(2)
    pid = os.fork()
    if pid == 0:  # child: publishes as worker 1
        code = 1
        try:
            s = Stats()
            s.conns["turn-tls"] += 3
            s.bytes_up += 100
            s.hello_failures["malformed"] += 2
            region.publish(1, s.snapshot())
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    mine = Stats()
    mine.conns["turn-tls"] += 1
    mine.conns["caddy"] += 5
    mine.active = 4
    region.publish(0, mine.snapshot())
    snaps = [s for s in (region.read(0), region.read(1)) if s is not None]
    total = merge(snaps)
    assert total["conns"] == {"turn-tls": 4, "caddy": 5}
    assert total["bytes_up"] == 100
    assert total["active"] == 4
    region.clear(1)
    assert region.read(1) is None


def test_republishing_replaces_the_slot() -> None:
    region = StatsRegion(1)
    s = Stats()
    for n in range(1, 50):
        s.bytes_down = n
        s.dial_failures[f"b{n % 7}"] += 1
        region.publish(0, s.snapshot())
    got = region.read(0)
    assert got is not None and got["bytes_down"] == 49
    assert sum(got["dial_failures"].values()) == 49  # type: ignore[union-attr]


def test_prometheus_text() -> None:
    snap = merge([
        {"conns": {"turn-tls": 2, 'we"ird': 1}, "bytes_up": 10, "bytes_down": 20, "active": 3,
         "hello_failures": {"timeout": 1}, "refused": {"per_ip": 4}, "dial_failures": {}},
    ])
    text = render(snap, {"tracked_client_ips": 2, "workers": 2, "worker_restarts_total": 1})
    assert 'orama_sni_router_connections_total{backend="turn-tls"} 2\n' in text
    assert 'orama_sni_router_connections_total{backend="we\\"ird"} 1\n' in text
    assert 'orama_sni_router_hello_failures_total{reason="timeout"} 1\n' in text
    assert 'orama_sni_router_limit_refusals_total{limit="global"} 0\n' in text
    assert 'orama_sni_router_limit_refusals_total{limit="per_ip"} 4\n' in text
    assert 'orama_sni_router_bytes_total{direction="client_to_backend"} 10\n' in text
    assert 'orama_sni_router_bytes_total{direction="backend_to_client"} 20\n' in text
    assert "orama_sni_router_active_connections 3\n" in text
    assert "orama_sni_router_tracked_client_ips 2\n" in text
    assert "# TYPE orama_sni_router_worker_restarts_total counter\n" in text
    assert "# TYPE orama_sni_router_workers gauge\n" in text
    # Every sample line is `name{labels} value` or `name value`; every family has TYPE.
    for line in text.splitlines():
        if not line.startswith("#"):
            assert re.fullmatch(r'[a-z_]+(\{[a-z_]+="(?:[^"\\]|\\.)*"\})? \d+', line), line
            family = line.split("{")[0].split(" ")[0]
            assert f"# TYPE {family} " in text


def test_metrics_endpoint_serves_get_and_head_and_404s_the_rest() -> None:
    import http.client

    from orama_stealth.router.metrics_http import CONTENT_TYPE, MetricsServer

    calls = []

    def body() -> str:
        calls.append(1)
        return "orama_sni_router_workers 2\n"

    server = MetricsServer(("127.0.0.1", 0), body)
    server.start()
    try:
        port = server.port

        def ask(method: str, path: str) -> tuple[int, str, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request(method, path)
                resp = conn.getresponse()
                return resp.status, resp.getheader("Content-Type", ""), resp.read()
            finally:
                conn.close()

        assert ask("GET", "/metrics") == (200, CONTENT_TYPE, b"orama_sni_router_workers 2\n")
        assert ask("GET", "/metrics?x=1")[0] == 200
        status, _, data = ask("HEAD", "/metrics")
        assert status == 200 and data == b""
        assert ask("GET", "/")[0] == 404
        assert ask("POST", "/metrics")[0] == 501
        assert len(calls) == 3  # rendered for the two GETs and the HEAD only
    finally:
        server.stop()
