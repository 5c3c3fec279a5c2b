"""Acceptance: upgrading the running router to a new build on reload, same PID, nothing dropped.

The router runs from a copy of the package (PYTHONPATH points at it), so a test can change the
"installed" code under it: a new `__version__`, a comment line, a syntax error. Clients are
real TLS connections through the router to a real TLS backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.procs import free_port, running
from support.router import LOOPBACK, Router, config_text
from support.tls_backends import Backend, Pki, client_context, hello, serving

SNI = "turn.example.test"
WORKERS = 2


@pytest.fixture(scope="module")
def farm(pki: Pki) -> Iterator[dict[str, Backend]]:
    made = {n: Backend(n, pki) for n in ("caddy", "turn")}
    with serving(made):
        yield made


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


def _build_of(version_line: str) -> str:
    m = re.search(r"build ([0-9a-f]+)", version_line)
    assert m is not None, version_line
    return m.group(1)


@contextlib.contextmanager
def installed(tmp_path: Path, farm: dict[str, Backend]) -> Iterator[Installed]:
    pkg = tmp_path / "site"
    src = Path(__file__).resolve().parents[3] / "orama_stealth"
    shutil.copytree(src, pkg / "orama_stealth", ignore=shutil.ignore_patterns("__pycache__"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "sni-router.yaml"
    config.write_text(config_text(
        port, [(SNI, ("turn", farm["turn"].addr))], ("caddy", farm["caddy"].addr),
        metrics_port, workers=WORKERS, drain_timeout="60s",
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


def test_upgrade_under_load_keeps_pid_connections_and_counters(
    tmp_path: Path, farm: dict[str, Backend], pki: Pki
) -> None:
    with installed(tmp_path, farm) as inst:
        r = inst.r
        first_build = _build_of(inst.version())
        assert inst.build_info() == first_build
        assert f"build={first_build}" in r.wait_log(r"event=ready")
        first_workers = inst.children()
        assert len(first_workers) == WORKERS
        sessions = [Session(r.port, pki, i) for i in range(5)]
        try:
            assert all(s.ping("before") for s in sessions)
            scraper = Scraper(r)
            load = Load(r.port, pki)
            try:
                time.sleep(0.3)
                # 1: a new version number, picked up by a plain SIGHUP.
                init = inst.package / "__init__.py"
                init.write_text(init.read_text().replace('__version__ = "0.1.0"',
                                                         '__version__ = "0.1.0+up1"'))
                second = inst.version()
                assert "0.1.0+up1" in second and _build_of(second) != first_build
                r.hup()
                r.wait_log(r"event=upgraded", timeout=60)
                assert inst.build_info() == _build_of(second)
                assert inst.status()["build"] == _build_of(second)
                assert all(s.ping("after-1") for s in sessions)
                time.sleep(0.3)
                # 2: the same version number, one comment more: a different build, through
                # the `reload` command, which waits for the outcome.
                routes = inst.package / "router" / "routes.py"
                routes.write_text(routes.read_text() + "# rebuilt\n")
                third = _build_of(inst.version())
                before = int(str(inst.status()["generation"]))
                out = inst.reload()
                assert out.returncode == 0, out.stdout + out.stderr
                assert third in out.stdout
                st = inst.status()
                assert st["ok"] is True and st["build"] == third and st["pid"] == r.pid
                assert int(str(st["generation"])) == before + 1
                assert inst.build_info() == third
                assert r.wait_log(r"event=upgraded", count=2)
                time.sleep(0.5)
            finally:
                load.finish()
                scraper.finish()
            assert r.proc.poll() is None
            assert load.failures == [], load.failures[:5]
            assert load.done >= 100, load.done
            assert load.slowest < 0.5, f"slowest handshake {load.slowest:.3f}s"
            assert scraper.errors == [], scraper.errors[:3]
            assert len(scraper.samples) >= 10
            assert scraper.backwards() == []
            # The old connections still talk, through workers of two builds ago.
            assert all(s.ping("after-2") for s in sessions)
            assert r.metric("upgrades_total") == 2.0
            assert r.metric("draining_workers") >= 1.0
            conns_before_close = r.metric('connections_total{backend="turn"}')
        finally:
            for s in sessions:
                s.close()
        # Once their connections are gone the old workers exit; only the new ones remain.
        r.wait_log(r"event=old_worker_exited .* left=0", timeout=30)
        assert r.wait_metric("draining_workers", 0.0) == 0.0
        now = inst.children()
        assert len(now) == WORKERS and not now & first_workers
        assert r.metric('connections_total{backend="turn"}') >= conns_before_close
        assert r.settled_metric("active_connections") == 0.0
        assert hello(r.port, SNI, pki)["backend"] == "turn"
        text = r.log_text()
        assert "event=worker_exited" not in text and "level=error" not in text, text[-3000:]


def test_a_build_that_cannot_start_is_refused_and_the_old_one_serves(
    tmp_path: Path, farm: dict[str, Backend], pki: Pki
) -> None:
    with installed(tmp_path, farm) as inst:
        r = inst.r
        old = inst.build_info()
        workers = inst.children()
        worker_py = inst.package / "router" / "worker.py"
        worker_py.write_text(worker_py.read_text() + "\ndef broken(:\n")
        out = inst.reload()
        assert out.returncode == 1, out.stdout + out.stderr
        assert "SyntaxError" in out.stderr and "worker.py" in out.stderr, out.stderr
        line = r.wait_log(r"event=upgrade_failed")
        assert "SyntaxError" in line
        assert r.metric("upgrade_failures_total") == 1.0
        st = inst.status()
        assert st["ok"] is False and "SyntaxError" in str(st["error"]) and st["build"] == old
        # A plain SIGHUP is refused the same way.
        r.hup()
        r.wait_log(r"event=upgrade_failed", count=2)
        assert r.wait_metric("upgrade_failures_total", 2.0) == 2.0
        # The old build, and the same workers, still serve.
        assert inst.build_info() == old
        assert inst.children() == workers
        for _ in range(5):
            assert hello(r.port, SNI, pki)["backend"] == "turn"
        assert r.metric("upgrades_total") == 0.0
        # A config that the installed code rejects never reaches the router.
        worker_py.write_text(worker_py.read_text().replace("\ndef broken(:\n", ""))
        good = r.config.read_text()
        r.write_config(good.replace("drain_timeout: 60s", "drain_timeout: soon"))
        out = inst.reload()
        assert out.returncode == 2 and "drain_timeout" in out.stderr, out.stderr
        assert r.metric("reload_failures_total") == 0.0
        assert r.log_text().count("event=upgrade_check") == 2
        r.write_config(good)
        r.signal(signal.SIGTERM)
        assert r.proc.wait(30) == 0
