"""Acceptance: upgrading the running router to a new build on reload, same PID, nothing dropped.

The router runs from a copy of the package (`support.upgrade`), so a test can change the
"installed" code under it: a new `__version__`, a comment line, a syntax error. The edge cases
(reloads and stops during an upgrade, new workers that never serve, crashes of either
generation) are in test_upgrade_edges.py.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.tls_backends import Backend, Pki, hello, serving
from support.upgrade import SNI, WORKERS, Load, Scraper, Session, build_of, installed


@pytest.fixture(scope="module")
def farm(pki: Pki) -> Iterator[dict[str, Backend]]:
    made = {n: Backend(n, pki) for n in ("caddy", "turn")}
    with serving(made):
        yield made


def test_upgrade_under_load_keeps_pid_connections_and_counters(
    tmp_path: Path, farm: dict[str, Backend], pki: Pki
) -> None:
    with installed(tmp_path, farm) as inst:
        r = inst.r
        first_build = build_of(inst.version())
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
                assert "0.1.0+up1" in second and build_of(second) != first_build
                r.hup()
                r.wait_log(r"event=upgraded", timeout=60)
                assert inst.build_info() == build_of(second)
                assert inst.status()["build"] == build_of(second)
                assert all(s.ping("after-1") for s in sessions)
                time.sleep(0.3)
                # 2: the same version number, one comment more: a different build, through
                # the `reload` command, which waits for the outcome.
                routes = inst.package / "router" / "routes.py"
                routes.write_text(routes.read_text() + "# rebuilt\n")
                third = build_of(inst.version())
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
