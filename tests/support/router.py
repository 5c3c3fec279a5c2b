"""Run a real `orama-sni-router --config FILE` for a test, and look at it from outside.

`router(tmp_path, routes=..., fallback=...)` writes the YAML, starts the router (the console
script when installed, else `python -m orama_stealth.router.cli`), waits for its `event=ready` line
(never by connecting to it, which would itself be a connection to account for), and stops it by
PID afterwards, even on failure. The handle exposes the log text, signals and `/metrics`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from support.procs import free_port, running

LOOPBACK = "127.0.0.1"

# A backend in a route is (name, "host:port") or (name, "host:port", "v1"|"v2").
BackendSpec = tuple[str, str] | tuple[str, str, str]


def router_argv() -> list[str]:
    exe = shutil.which("orama-sni-router")
    return [exe] if exe else [sys.executable, "-m", "orama_stealth.router.cli"]


def backend_yaml(spec: BackendSpec) -> dict[str, str]:
    out = {"name": spec[0], "addr": spec[1]}
    if len(spec) == 3:
        out["proxy_protocol"] = spec[2]
    return out


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def config_text(
    port: int,
    routes: Sequence[tuple[str, BackendSpec]],
    fallback: BackendSpec,
    metrics_port: int | None = None,
    tcp_listeners: Sequence[tuple[str, int, BackendSpec]] = (),
    host: str = LOOPBACK,
    **options: Any,
) -> str:
    doc: dict[str, Any] = {"listen": hostport(host, port)}
    doc.update(options)
    if metrics_port is not None:
        doc["metrics_listen"] = f"{LOOPBACK}:{metrics_port}"
    doc["fallback"] = backend_yaml(fallback)
    doc["routes"] = [{"match": m, "backend": backend_yaml(b)} for m, b in routes]
    if tcp_listeners:
        doc["listeners"] = [
            {"name": n, "listen": f"{LOOPBACK}:{p}", "mode": "tcp", "backend": backend_yaml(b)}
            for n, p, b in tcp_listeners
        ]
    return yaml.safe_dump(doc, sort_keys=False)


@dataclass
class Router:
    proc: Any
    config: Path
    log: Path
    port: int
    metrics_port: int
    tcp_ports: dict[str, int] = field(default_factory=dict)
    host: str = LOOPBACK

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 10.0, count: int = 1) -> str:
        """Wait until `pattern` (a regex) matches `count` log lines; return the last one."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            hits = [ln for ln in self.log_text().splitlines() if rx.search(ln)]
            if len(hits) >= count:
                return hits[count - 1]
            if self.proc.poll() is not None or time.monotonic() > deadline:
                state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
                raise AssertionError(
                    f"no {count} log line(s) matching {pattern!r} (router {state})"
                    f"\n--- {self.log} ---\n{self.log_text()[-4000:]}"
                )
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def hup(self) -> None:
        self.signal(signal.SIGHUP)

    def term(self) -> None:
        self.signal(signal.SIGTERM)

    def write_config(self, text: str) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config)

    def metrics_text(self) -> str:
        url = f"http://{LOOPBACK}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    def metrics(self) -> dict[str, float]:
        """Samples by full name with labels: `orama_sni_router_bytes_total{direction="..."}`."""
        out: dict[str, float] = {}
        for line in self.metrics_text().splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
        return out

    def metric(self, name: str, default: float | None = None) -> float:
        full = name if name.startswith("orama_sni_router_") else f"orama_sni_router_{name}"
        m = self.metrics()
        if full in m:
            return m[full]
        if default is not None:
            return default
        raise AssertionError(f"metric {full} not exported; have: {sorted(m)}")

    def settled_metric(self, name: str, quiet: float = 0.75, timeout: float = 15.0) -> float:
        """The value once it stops moving for three publishing periods (workers publish their
        counters every 0.25 s)."""
        deadline = time.monotonic() + timeout
        last = self.metric(name, default=0.0)
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.metric(name, default=0.0)
            if now == last:
                return now
            last = now
        return last

    def wait_metric(self, name: str, want: float, timeout: float = 10.0) -> float:
        """Metrics are published in batches: poll until `name == want`."""
        deadline = time.monotonic() + timeout
        got = self.metric(name, default=float("nan"))
        while got != want and time.monotonic() < deadline:
            time.sleep(0.1)
            got = self.metric(name, default=float("nan"))
        return got


@contextlib.contextmanager
def router(
    tmp_path: Path,
    *,
    routes: Sequence[tuple[str, BackendSpec]],
    fallback: BackendSpec,
    workers: int = 1,
    tcp_backends: Mapping[str, BackendSpec] | None = None,
    ready_timeout: float = 20.0,
    host: str = LOOPBACK,
    **options: Any,
) -> Iterator[Router]:
    """Start a router on free loopback ports; `options` are extra top-level YAML keys."""
    # Short by default so stopping a router never waits out the production 30s drain.
    options.setdefault("drain_timeout", "2s")
    port = free_port(host)
    metrics_port = free_port()
    tcp_ports = {name: free_port() for name in (tcp_backends or {})}
    d = tmp_path / f"router-{port}"
    d.mkdir(parents=True, exist_ok=True)
    config = d / "sni-router.yaml"
    tcp = [(n, tcp_ports[n], b) for n, b in (tcp_backends or {}).items()]
    config.write_text(
        config_text(
            port, routes, fallback, metrics_port, tcp, host=host, workers=workers, **options
        )
    )
    log = d / "router.log"
    with running([*router_argv(), "--config", config], log=log) as proc:
        r = Router(proc, config, log, port, metrics_port, tcp_ports, host)
        r.wait_log(r"event=ready", timeout=ready_timeout)
        yield r
