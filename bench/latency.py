"""One connection at a time: connect + TLS handshake + one tiny GET, until the response ends."""

from __future__ import annotations

import socket
import ssl
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench.origin import SNI, TINY_PATH


@dataclass(frozen=True, slots=True)
class LatencyResult:
    count: int
    failures: int
    p50_ms: float
    p99_ms: float


def _one(ctx: ssl.SSLContext, host: str, port: int, request: bytes) -> float:
    t0 = time.perf_counter()
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname=SNI) as tls:
            tls.sendall(request)
            body = b""
            while chunk := tls.recv(4096):
                body += chunk
    elapsed = time.perf_counter() - t0
    if not body.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected response {body[:60]!r}")
    return elapsed


def measure(host: str, port: int, ca_file: Path, count: int, max_seconds: float) -> LatencyResult:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    request = f"GET {TINY_PATH} HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n\r\n".encode()
    samples: list[float] = []
    failures = 0
    deadline = time.monotonic() + max_seconds
    for _ in range(min(20, count)):  # warm caches and the allocator, not measured
        _one(ctx, host, port, request)
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            samples.append(_one(ctx, host, port, request))
        except (OSError, RuntimeError):
            failures += 1
    if not samples:
        raise RuntimeError(f"no successful connection to {host}:{port} ({failures} failures)")
    samples.sort()
    p99 = samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))]
    return LatencyResult(len(samples), failures, statistics.median(samples) * 1e3, p99 * 1e3)
