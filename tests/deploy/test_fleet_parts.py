"""The parts a fleet run leans on, without nodes: the per-node lines, the canary's state
verdicts, a snapshot cut short, the wheel built once when every host asks at the same moment,
and the lab's fleet names."""

from __future__ import annotations

from pathlib import Path

import gevent
import pytest

from orama_stealth.deploy import runlog, wheels
from orama_stealth.deploy.canary import parse_state, soak_verdict
from orama_stealth.deploy.facts import TextFile, parse_snapshot
from orama_stealth.lab.cli import fleet_names
from orama_stealth.lab.nodeconf import SpecError

REPO = Path(__file__).resolve().parents[2]


def test_each_node_gets_one_line_saying_how_it_ended() -> None:
    log = runlog.RunLog()
    log.verdicts["a"] = (runlog.CUT_OVER, "router build 1234")
    log.verdicts["b"] = (runlog.REFUSED, "preflight: the TURN server's TLS port 5349 ...")
    log.failed_at["c"] = "3a. install"
    log.verdicts["e"] = (runlog.HALF_WAY, "switched to the router, not verified")
    log.verdicts["f"] = (runlog.HALF_WAY, "switched to the router, not verified")
    log.failed_at["f"] = "4b. switch"
    log.verdicts["g"] = (runlog.CUT_OVER, "router build 1234")
    log.failed_at["g"] = "5d. served certificate"
    assert log.line("a") == "orama-stealth: a: cut over (router build 1234)"
    assert log.line("b") == ("orama-stealth: b: refused, untouched (preflight: the TURN "
                             "server's TLS port 5349 ...)")
    assert log.line("c") == "orama-stealth: c: failed (at 3a. install)"
    assert log.line("d") == ("orama-stealth: d: untouched (not reached: the run stopped before "
                             "this node)")
    assert log.line("e") == ("orama-stealth: e: stopped half-way (switched to the router, not "
                             "verified)")
    assert log.line("f") == ("orama-stealth: f: failed (at 4b. switch; switched to the router, "
                             "not verified)")
    assert log.line("g").startswith("orama-stealth: g: failed (at 5d. served certificate")


def test_canary_state_verdicts() -> None:
    assert parse_state("c", "").state == "never cut over"
    assert parse_state("c", "{not json").state.startswith("unreadable")
    assert parse_state("c", "[1]").state.startswith("unreadable")
    st = parse_state("c", '{"state": "cutover", "since": 1000}')
    assert soak_verdict(st, 0, 1000.0) is None
    verdict = soak_verdict(st, 86400, 1100.0)
    assert verdict is not None and "needs canary_soak=86400s" in verdict
    verdict = soak_verdict(parse_state("c", '{"state": "rolled-back", "since": 1}'), 0, 5.0)
    assert verdict == "canary c is not cut over (state: rolled-back)"


def test_a_read_cut_short_is_not_an_empty_node() -> None:
    lines = ["caddy_active=active", "listen=0.0.0.0:443 users:((\"caddy\",pid=1,fd=3))"]
    assert not parse_snapshot(lines).complete
    full = parse_snapshot([*lines, "complete=yes"])
    assert full.complete and full.caddy_on(443)
    fact = TextFile()
    assert fact.default() is None  # what pyinfra returns when the command failed or timed out
    assert fact.process(["absent"]) == ""
    assert fact.process(["b64:aGk="]) == "hi"


def test_every_host_asking_at_once_builds_the_wheel_once(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(wheels.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(wheels, "_sets", {})
    builds: list[Path] = []
    real_build = wheels._build

    def counted(root: Path, out: Path) -> None:
        builds.append(out)
        gevent.sleep(0.05)  # let the other greenlets reach the lock meanwhile
        real_build(root, out)

    monkeypatch.setattr(wheels, "_build", counted)
    greenlets = [gevent.spawn(wheels.wheel_set, REPO) for _ in range(4)]
    gevent.joinall(greenlets, timeout=300, raise_error=True)
    sets = {g.value for g in greenlets}
    assert len(sets) == 1 and len(builds) == 1
    assert [p.name for p in tmp_path.iterdir()] == [next(iter(sets)).fingerprint]


def test_lab_fleet_names() -> None:
    assert fleet_names("labnode", 1) == ["labnode"]
    assert fleet_names("fl", 3) == ["fl-1", "fl-2", "fl-3"]
    with pytest.raises(SpecError):
        fleet_names("fl", 0)
