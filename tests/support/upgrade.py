"""A router running from a copy of the package, and the clients that watch it, for the upgrade
tests.

The router runs from a copy of orama_stealth (PYTHONPATH points at it), so a test can change the
"installed" code under it: a new `__version__`, a comment line, a syntax error, a worker that
fails at start. Clients are real TLS connections through the router to a real TLS backend.

- `installed(tmp_path, farm)`: the router on that copy (`Installed`: its cli, status file,
  build, children).
- `Load`: a new TLS connection every 5 ms, each one's handshake timed; bounded.
- `Scraper`: /metrics every 50 ms, to show that no counter goes backwards.
- `Session`: a long-lived connection to the backend's echo.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from support.procs import free_port, running
from support.router import LOOPBACK, Router, config_text
from support.tls_backends import Backend, Pki, client_context

SNI = "turn.example.test"
WORKERS = 2


@dataclass
class Installed:
    """A router running the code of `pkg` (a copy of orama_stealth)."""

    r: Router
    pkg: Path
    run_dir: Path
    env: dict[str, str]

    @property
    def package(self) -> Path:
        return self.pkg / "orama_stealth"

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orama_stealth.router.cli", *args], env=self.env,
            cwd=self.pkg, capture_output=True, text=True, timeout=timeout,
        )

    def version(self) -> str:
        out = self.cli("--version", "--config", str(self.r.config))
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def reload(self) -> subprocess.CompletedProcess[str]:
        return self.cli("reload", "--config", str(self.r.config), "--pid", str(self.r.pid),
                        "--runtime-dir", str(self.run_dir))

    def status(self) -> dict[str, object]:
        return dict(json.loads((self.run_dir / "status.json").read_text()))

    def build_info(self) -> str:
        line = next(ln for ln in self.r.metrics_text().splitlines()
                    if ln.startswith("orama_sni_router_build_info{"))
        m = re.search(r'build="([0-9a-f]+)"', line)
        assert m is not None, line
        return m.group(1)

    def children(self) -> set[int]:
        text = Path(f"/proc/{self.r.pid}/task/{self.r.pid}/children").read_text()
        return {int(x) for x in text.split()}


def build_of(version_line: str) -> str:
    m = re.search(r"build ([0-9a-f]+)", version_line)
    assert m is not None, version_line
    return m.group(1)


@contextlib.contextmanager
def installed(
    tmp_path: Path, farm: dict[str, Backend], drain_timeout: str = "60s"
) -> Iterator[Installed]:
    pkg = tmp_path / "site"
    src = Path(__file__).resolve().parents[2] / "orama_stealth"
    shutil.copytree(src, pkg / "orama_stealth", ignore=shutil.ignore_patterns("__pycache__"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "sni-router.yaml"
    config.write_text(config_text(
        port, [(SNI, ("turn", farm["turn"].addr))], ("caddy", farm["caddy"].addr),
        metrics_port, workers=WORKERS, drain_timeout=drain_timeout,
    ))
    env = dict(os.environ, PYTHONPATH=str(pkg))
    log = tmp_path / "router.log"
    argv = [sys.executable, "-m", "orama_stealth.router.cli", "--config", str(config),
            "--runtime-dir", str(run_dir)]
    with running(argv, log=log, env=env, cwd=pkg) as proc:
        r = Router(proc, config, log, port, metrics_port)
        r.wait_log(r"event=ready", timeout=20)
        yield Installed(r, pkg, run_dir, env)


@dataclass
class Load:
    """A new TLS connection through the router every 5 ms, handshake timed; bounded."""

    port: int
    pki: Pki
    max_count: int = 3000
    max_time: float = 60.0
    done: int = 0
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._ctx = client_context(self.pki)
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_time
        while not self.stop.is_set() and self.done < self.max_count:
            if time.monotonic() > deadline:
                break
            t0 = time.monotonic()
            try:
                raw = socket.create_connection((LOOPBACK, self.port), timeout=5)
                with self._ctx.wrap_socket(raw, server_hostname=SNI):
                    self.slowest = max(self.slowest, time.monotonic() - t0)
            except (OSError, ssl.SSLError) as e:
                self.failures.append(f"{type(e).__name__}: {e}")
            self.done += 1
            time.sleep(0.005)

    def finish(self) -> None:
        self.stop.set()
        self._t.join(30)


@dataclass
class Scraper:
    """Reads /metrics every 50 ms; every counter must only ever grow."""

    r: Router
    samples: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        for _ in range(2000):
            if self.stop.wait(0.05):
                return
            try:
                self.samples.append(self.r.metrics())
            except OSError as e:
                self.errors.append(str(e))

    def finish(self) -> None:
        self.stop.set()
        self._t.join(30)

    def backwards(self) -> list[str]:
        out = []
        for prev, cur in zip(self.samples, self.samples[1:], strict=False):
            for name, value in prev.items():
                if "_total" in name and cur.get(name, 0.0) < value:
                    out.append(f"{name}: {value} -> {cur.get(name)}")
        return out


class Session:
    """A long-lived TLS connection through the router to the backend's echo."""

    def __init__(self, port: int, pki: Pki, i: int) -> None:
        raw = socket.create_connection((LOOPBACK, port), timeout=15)
        self.s = client_context(pki).wrap_socket(raw, server_hostname=SNI)
        self.i = i
        self.s.sendall(b"ECHO\n")

    def ping(self, tag: str) -> bool:
        msg = f"{tag} {self.i}\n".encode()
        self.s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            data = self.s.recv(len(msg) - len(got))
            if not data:
                break
            got += data
        return got == msg

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.s.close()
