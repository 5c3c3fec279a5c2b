"""Acceptance: what happens to an upgrade on reload at its edges.

A SIGHUP or a SIGTERM that arrives while the new build is being checked, a new build whose
workers die before they serve, upgrades in a row while an earlier generation still drains a
connection, and workers of either generation that die afterwards. The router runs from a copy
of the package (`support.upgrade`); a test makes the copy's `check` slow, or its worker fail or
wait at start, by editing that copy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.router import LOOPBACK
from support.tls_backends import Backend, Pki, hello, serving
from support.upgrade import SNI, WORKERS, Installed, Load, Scraper, Session, build_of, installed

CHECK_ANCHOR = '    if args.command == "check":\n'
SERVE_ANCHOR = "        loop = asyncio.get_running_loop()\n        await self.start(loop)\n"


@pytest.fixture(scope="module")
def farm(pki: Pki) -> Iterator[dict[str, Backend]]:
    made = {n: Backend(n, pki) for n in ("caddy", "turn")}
    with serving(made):
        yield made


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path}: {old!r} not found"
    path.write_text(text.replace(old, new, 1))


def slow_check(inst: Installed, seconds: float) -> None:
    """The copy's `check` waits after its imports (it has read every file it needs)."""
    edit(inst.package / "router" / "cli.py", CHECK_ANCHOR,
         f"{CHECK_ANCHOR}        time.sleep({seconds})\n")


def fast_check(inst: Installed, seconds: float) -> None:
    edit(inst.package / "router" / "cli.py", f"{CHECK_ANCHOR}        time.sleep({seconds})\n",
         CHECK_ANCHOR)


def rebuild(inst: Installed, tag: str) -> str:
    """One comment more: a different build; its fingerprint."""
    routes = inst.package / "router" / "routes.py"
    routes.write_text(routes.read_text() + f"# {tag}\n")
    return build_of(inst.version())


def check_pids(inst: Installed) -> list[int]:
    out = []
    for pid in inst.children():
        with contextlib.suppress(OSError):
            if b"\0check\0" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
    return out


def alive(pid: int) -> bool:
    """Running, not a zombie (an exited child its parent has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until(what: str, pred: object, timeout: float = 15.0) -> None:
    assert callable(pred)
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"not within {timeout:g}s: {what}"
        time.sleep(0.05)


def refused(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@dataclass
class StatusWatch:
    """Every distinct status file the router writes, read every 20 ms (bounded)."""

    inst: Installed
    seen: list[tuple[int, bool, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        for _ in range(5000):
            if self.stop.wait(0.02):
                return
            with contextlib.suppress(OSError, ValueError):
                st = self.inst.status()
                now = (int(str(st["generation"])), bool(st["ok"]), str(st["build"]))
                if not self.seen or self.seen[-1] != now:
                    self.seen.append(now)

    def finish(self) -> None:
        self.stop.set()
        self._t.join(10)


def test_sighups_during_the_check_are_queued_and_reload_after_the_upgrade(
    tmp_path: Path, farm: dict[str, Backend], pki: Pki
) -> None:
    with installed(tmp_path, farm) as inst:
        r = inst.r
        gen0 = int(str(inst.status()["generation"]))
        first = inst.children()
        # Build 2 checks for 1.5 s, and its workers wait 1.5 s before serving: time to send
        # SIGHUPs during the check, and to install build 3 before the queued reload runs.
        slow_check(inst, 1.5)
        edit(inst.package / "router" / "worker.py", SERVE_ANCHOR,
             f"        await asyncio.sleep(1.5)\n{SERVE_ANCHOR}")
        second = rebuild(inst, "2")
        watch = StatusWatch(inst)
        load = Load(r.port, pki)
        try:
            time.sleep(0.2)
            r.hup()
            r.wait_log(r"event=upgrade_check", timeout=10)
            (checker,) = check_pids(inst)
            r.hup()
            r.hup()  # several queued SIGHUPs make one reload
            r.wait_log(r"event=reload_queued", timeout=10)
            assert alive(checker), "the queued SIGHUPs must not cut the check short"
            r.wait_log(r"event=adopting", timeout=15)
            assert not alive(checker)
            fast_check(inst, 1.5)
            edit(inst.package / "router" / "worker.py",
                 f"        await asyncio.sleep(1.5)\n{SERVE_ANCHOR}", SERVE_ANCHOR)
            third = rebuild(inst, "3")
            r.wait_log(r"event=upgraded", timeout=20)
            r.wait_log(r"event=upgraded", count=2, timeout=20)
            time.sleep(0.3)
        finally:
            load.finish()
            watch.finish()
        assert r.proc.poll() is None
        assert load.failures == [], load.failures[:5]
        assert load.done >= 100, load.done
        text = r.log_text()
        assert text.count("event=reload_queued") == 1, text[-3000:]
        assert text.count("event=upgrade_check") == 2
        st = inst.status()
        assert st["ok"] is True and st["build"] == third and st["pid"] == r.pid
        # One status per outcome: the upgrade to build 2, then the queued reload's (build 3).
        assert watch.seen[0][0] == gen0
        assert [s for s in watch.seen if s[0] > gen0] == [
            (gen0 + 1, True, second), (gen0 + 2, True, third)
        ], watch.seen
        assert inst.build_info() == third
        assert r.metric("upgrades_total") == 2.0
        assert r.metric("upgrade_failures_total") == 0.0
        r.wait_log(r"event=old_worker_exited .* left=0", timeout=30)
        wait_until("only build 3's workers", lambda: len(inst.children()) == WORKERS)
        assert not inst.children() & first
        assert hello(r.port, SNI, pki)["backend"] == "turn"
        assert "level=error" not in r.log_text()


def test_sigterm_during_the_check_stops_cleanly_and_leaves_no_check_behind(
    tmp_path: Path, farm: dict[str, Backend], pki: Pki
) -> None:
    with installed(tmp_path, farm) as inst:
        r = inst.r
        workers = inst.children()
        slow_check(inst, 20)
        rebuild(inst, "2")
        session = Session(r.port, pki, 0)
        try:
            assert session.ping("before")
            r.hup()
            r.wait_log(r"event=upgrade_check", timeout=10)
            (checker,) = check_pids(inst)
            t0 = time.monotonic()
            r.term()
            r.wait_log(r"event=draining", timeout=10)
            # Killed and reaped by the router: gone, not orphaned (nor a zombie).
            wait_until("the check gone", lambda: not alive(checker), timeout=10)
            wait_until("nothing accepting", lambda: refused(r.port), timeout=5)
            # The live connection still drains through its worker.
            assert session.ping("draining")
        finally:
            session.close()
        assert r.proc.wait(30) == 0
        took = time.monotonic() - t0
        assert took < 10, f"stop took {took:.1f}s"
        assert not alive(checker)
        assert not any(alive(pid) for pid in workers)
        assert refused(r.port) and refused(r.metrics_port)
        text = r.log_text()
        assert "event=stopped" in text and "event=upgrading" not in text, text[-3000:]
        assert "level=error" not in text


def test_new_workers_that_die_before_serving_fail_the_upgrade_at_once(
    tmp_path: Path, farm: dict[str, Backend], pki: Pki
) -> None:
    with installed(tmp_path, farm) as inst:
        r = inst.r
        first = inst.build_info()
        workers = inst.children()
        worker_py = inst.package / "router" / "worker.py"
        good = worker_py.read_text()
        # `check` imports the worker module but never starts a worker: it passes.
        edit(worker_py, SERVE_ANCHOR,
             f'        raise RuntimeError("no start today")\n{SERVE_ANCHOR}')
        load = Load(r.port, pki)
        try:
            time.sleep(0.2)
            t0 = time.monotonic()
            out = inst.reload()
            took = time.monotonic() - t0
            assert out.returncode == 1, out.stdout + out.stderr
            assert "before serving" in out.stderr and "RuntimeError: no start today" in out.stderr
            assert took < 10, f"the failure took {took:.1f}s to report"
            line = r.wait_log(r"event=upgrade_failed")
            assert "RuntimeError: no start today" in line, line
            st = inst.status()
            assert st["ok"] is False and "no start today" in str(st["error"])
            assert st["pid"] == r.pid
            assert r.metric("upgrade_failures_total") == 1.0
            assert r.metric("upgrades_total") == 0.0
            # The old workers were never told to drain: they serve, all of them.
            time.sleep(1.5)
            assert workers <= inst.children()
            assert r.metric("draining_workers") == 0.0
            # A fixed build upgrades as usual; the old workers drain then.
            worker_py.write_text(good + "# fixed\n")
            third = build_of(inst.version())
            out = inst.reload()
            assert out.returncode == 0, out.stdout + out.stderr
            assert third in out.stdout
            r.wait_log(r"event=upgraded", timeout=10)
            time.sleep(0.3)
        finally:
            load.finish()
        assert load.failures == [], load.failures[:5]
        assert load.done >= 100, load.done
        st = inst.status()
        assert st["ok"] is True and st["build"] == third
        assert inst.build_info() == third != first
        assert r.metric("upgrades_total") == 1.0
        assert r.metric("upgrade_failures_total") == 1.0
        wait_until("the first workers gone", lambda: not inst.children() & workers)
        wait_until("only the fixed build's workers",
                   lambda: len(inst.children()) == WORKERS)
        assert hello(r.port, SNI, pki)["backend"] == "turn"


def test_upgrades_in_a_row_while_older_generations_drain_their_connections(
    tmp_path: Path, farm: dict[str, Backend], pki: Pki
) -> None:
    with installed(tmp_path, farm) as inst:
        r = inst.r
        gen1 = inst.children()
        oldest = Session(r.port, pki, 1)
        middle: Session | None = None
        try:
            assert oldest.ping("gen1")
            scraper = Scraper(r)
            load = Load(r.port, pki)
            try:
                time.sleep(0.2)
                rebuild(inst, "2")
                out = inst.reload()
                assert out.returncode == 0, out.stdout + out.stderr
                # Gen 1 keeps only the worker with the connection.
                r.wait_log(r"event=old_worker_exited .* left=1", timeout=15)
                gen2 = inst.children() - gen1
                assert len(gen2) == WORKERS
                middle = Session(r.port, pki, 2)
                assert middle.ping("gen2")
                rebuild(inst, "3")
                out = inst.reload()
                assert out.returncode == 0, out.stdout + out.stderr
                r.wait_log(r"event=old_worker_exited .* left=2", timeout=15)
                time.sleep(0.3)
            finally:
                load.finish()
                scraper.finish()
            assert load.failures == [], load.failures[:5]
            assert scraper.errors == [] and len(scraper.samples) >= 10
            assert scraper.backwards() == []
            # Three generations: one worker of gen 1, one of gen 2, the serving ones.
            now = inst.children()
            (g1,) = now & gen1
            (g2,) = now & gen2
            assert len(now - gen1 - gen2) == WORKERS
            assert r.metric("draining_workers") == 2.0
            assert r.metric("upgrades_total") == 2.0
            assert oldest.ping("gen1-after-2") and middle.ping("gen2-after-2")
            before = r.metrics()
            # The oldest exits when its connection ends, and only it.
            oldest.close()
            wait_until("gen 1 gone", lambda: not alive(g1))
            r.wait_log(rf"event=old_worker_exited .*pid={g1} .*left=1")
            assert alive(g2) and middle.ping("gen2-after-1-gone")
            after = r.metrics()
            assert [k for k, v in before.items() if "_total" in k and after.get(k, 0.0) < v] == []
        finally:
            oldest.close()
            if middle is not None:
                middle.close()
        r.wait_log(r"event=old_worker_exited .* left=0", timeout=15)
        assert r.wait_metric("draining_workers", 0.0) == 0.0
        assert r.settled_metric("active_connections") == 0.0
        assert len(inst.children()) == WORKERS
        assert "level=error" not in r.log_text()


def test_a_new_worker_that_dies_is_restarted_an_old_one_is_only_reaped(
    tmp_path: Path, farm: dict[str, Backend], pki: Pki
) -> None:
    with installed(tmp_path, farm) as inst:
        r = inst.r
        gen1 = inst.children()
        session = Session(r.port, pki, 1)
        try:
            assert session.ping("gen1")
            rebuild(inst, "2")
            out = inst.reload()
            assert out.returncode == 0, out.stdout + out.stderr
            r.wait_log(r"event=old_worker_exited .* left=1", timeout=15)
            (draining,) = inst.children() & gen1
            gen2 = inst.children() - gen1
            assert len(gen2) == WORKERS
            scraper = Scraper(r)
            try:
                # A worker of the serving generation dies: restarted, as always.
                victim = min(gen2)
                os.kill(victim, signal.SIGKILL)
                r.wait_log(rf"event=worker_exited .*pid={victim} ", timeout=10)
                wait_until("a replacement worker", lambda: len(inst.children() - gen1) == WORKERS
                           and victim not in inst.children())
                replaced = inst.children() - gen1
                assert r.wait_metric("worker_restarts_total", 1.0) == 1.0
                assert r.wait_metric("workers", float(WORKERS)) == float(WORKERS)
                # A draining worker of the old generation dies: reaped, not restarted.
                os.kill(draining, signal.SIGKILL)
                r.wait_log(rf"event=old_worker_exited .*pid={draining} .*left=0", timeout=10)
                assert r.wait_metric("draining_workers", 0.0) == 0.0
                time.sleep(1.5)  # longer than a restart's backoff
                assert inst.children() == replaced
                assert r.metric("worker_restarts_total") == 1.0
                for _ in range(WORKERS * 3):
                    assert hello(r.port, SNI, pki)["backend"] == "turn"
            finally:
                scraper.finish()
            assert scraper.errors == [] and scraper.backwards() == []
        finally:
            session.close()
        assert r.metric("upgrades_total") == 1.0
        assert r.log_text().count("event=worker_exited") == 1
