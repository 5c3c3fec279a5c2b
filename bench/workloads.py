"""The workloads. Each runs against one started target and returns its figures.

The proxy's CPU figure is the utime+stime its process tree spent during the measured part,
divided by the work done; it is None for the direct target, which has no proxy.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time
from pathlib import Path

from bench import latency, loadgen, proctree
from bench.origin import SNI, Origin
from bench.settings import Settings
from bench.targets import Endpoint

Figures = dict[str, float | int | None]

WORKLOADS = ("w1_new_conns", "w1_latency", "w2_keepalive", "w3_bulk_1", "w3_bulk_n", "w4_idle")


def _cpu(ep: Endpoint) -> proctree.TreeSample | None:
    return None if ep.pid is None else proctree.sample(ep.pid)


def _per(
    s0: proctree.TreeSample | None, s1: proctree.TreeSample | None, units: float, scale: float
) -> float | None:
    if s0 is None or s1 is None or units <= 0:
        return None
    return (s1.cpu_s - s0.cpu_s) / units * scale


def _sys_share(s0: proctree.TreeSample | None, s1: proctree.TreeSample | None) -> float | None:
    """Kernel share of the proxy's CPU: what no user-space change can remove."""
    if s0 is None or s1 is None or s1.cpu_s <= s0.cpu_s:
        return None
    return (s1.sys_s - s0.sys_s) / (s1.cpu_s - s0.cpu_s)


def w1_new_conns(ep: Endpoint, s: Settings) -> Figures:
    if s.warmup_seconds:
        loadgen.wrk(ep.port, connections=s.w1_connections, seconds=s.warmup_seconds, close=True)
    c0 = _cpu(ep)
    r = loadgen.wrk(ep.port, connections=s.w1_connections, seconds=s.w1_seconds, close=True)
    c1 = _cpu(ep)
    return {"conns_per_s": r.req_per_s, "conns": r.requests, "errors": r.errors,
            "proxy_cpu_us_per_conn": _per(c0, c1, r.requests, 1e6),
            "proxy_sys_share": _sys_share(c0, c1)}


def w1_latency(ep: Endpoint, origin: Origin, s: Settings) -> Figures:
    r = latency.measure(ep.host, ep.port, origin.ca_file, s.w1_serial_count, max_seconds=60)
    return {"p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "count": r.count, "errors": r.failures}


def w2_keepalive(ep: Endpoint, s: Settings) -> Figures:
    if s.warmup_seconds:
        loadgen.wrk(ep.port, connections=s.w2_connections, seconds=s.warmup_seconds, close=False)
    c0 = _cpu(ep)
    r = loadgen.wrk(ep.port, connections=s.w2_connections, seconds=s.w2_seconds, close=False)
    c1 = _cpu(ep)
    return {"req_per_s": r.req_per_s, "requests": r.requests, "errors": r.errors,
            "proxy_cpu_us_per_req": _per(c0, c1, r.requests, 1e6),
            "proxy_sys_share": _sys_share(c0, c1)}


def w3_bulk(ep: Endpoint, origin: Origin, streams: int) -> Figures:
    c0 = _cpu(ep)
    r = loadgen.curl_parallel(ep.port, origin.ca_file, streams, origin.big_size, timeout=300)
    c1 = _cpu(ep)
    return {"mb_per_s": r.mb_per_s, "bytes": r.bytes, "streams": streams, "errors": r.failures,
            "proxy_cpu_s_per_gb": _per(c0, c1, r.bytes, 1e9),
            "proxy_sys_share": _sys_share(c0, c1)}


def _readline(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"idle client {proc.pid} exited ({proc.poll()})")
            return line.strip()
    raise TimeoutError(f"idle client {proc.pid} did not answer in time")


def w4_idle(ep: Endpoint, origin: Origin, s: Settings, max_seconds: float = 180) -> Figures:
    """Hold s.idle_count routed connections (handshake done, then idle); memory per connection."""
    watch = ep.pid if ep.pid is not None else origin.pid
    time.sleep(0.3)
    before = proctree.sample(watch)
    share = [s.idle_count // s.idle_clients + (i < s.idle_count % s.idle_clients)
             for i in range(s.idle_clients)]
    clients: list[subprocess.Popen[str]] = []
    deadline = time.monotonic() + max_seconds
    try:
        for n in share:
            clients.append(subprocess.Popen(
                [sys.executable, "-m", "bench.idle_client", ep.host, str(ep.port), SNI,
                 str(origin.ca_file), str(n), str(max_seconds)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                cwd=str(Path(__file__).resolve().parent.parent),
            ))
        held = failed = 0
        for c in clients:
            _, h, f = _readline(c, deadline + 10).split()
            held, failed = held + int(h), failed + int(f)
        time.sleep(1.0)  # let the proxy finish dialling and settle its buffers
        after = proctree.sample(watch, sockets=True)
        alive = 0
        for c in clients:
            assert c.stdin is not None
            c.stdin.write("check\n")
            c.stdin.flush()
            alive += int(_readline(c, time.monotonic() + 30).split()[1])
        for c in clients:
            assert c.stdin is not None
            c.stdin.write("close\n")
            c.stdin.flush()
    finally:
        for c in clients:
            try:
                c.wait(30)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait(5)
    per_conn = None
    if ep.pid is not None and held:
        per_conn = (after.rss_kib - before.rss_kib) / held
    return {"requested": s.idle_count, "held": held, "alive": alive, "errors": failed,
            "rss_before_kib": before.rss_kib, "rss_after_kib": after.rss_kib,
            "sockets": after.sockets, "kib_per_conn": per_conn}
