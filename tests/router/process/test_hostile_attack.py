"""Acceptance: attackers holding twice the connection cap in unfinished hellos, re-opening every
connection the router closes, do not shut legitimate clients out, and connections already
relaying are never evicted.

It runs for 20 s of attack, so once, on the event loop production runs (uvloop): the eviction
path is the worker's, the same on either loop, and the short tests cover both loops."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.hostile import NAME, attackers, echo_conns, echoes, handshake, report, wait_for
from support.router import router
from support.tls_backends import Backend, Pki


@pytest.fixture(scope="module", params=["uvloop"], autouse=True)
def event_loop_name(request: pytest.FixtureRequest) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORAMA_LOOP", str(request.param))
        yield str(request.param)


ATTACK_CAP = 200
ATTACK_SECONDS = 20.0
LEGIT_EVERY = 0.05


@pytest.mark.slow
def test_attackers_holding_twice_the_cap_in_hellos_do_not_shut_legitimate_clients_out(
    tmp_path: Path, pki: Pki, turn: Backend, caddy: Backend
) -> None:
    with (
        router(
            tmp_path, routes=[(NAME, ("turn", turn.addr))], fallback=("caddy", caddy.addr),
            workers=2, max_concurrent_conns=ATTACK_CAP,
        ) as r,
        echo_conns(r.port, pki, 10) as established,
        attackers(r.port, 2 * ATTACK_CAP, ATTACK_SECONDS + 3) as attack,
    ):
        # The attack is on once the router is full and making room.
        assert wait_for(lambda: r.metric("hello_evicted_total", 0.0) > 0, 10), r.log_text()[-2000:]
        waits: list[float] = []
        failed = 0
        echo_failures = 0
        started = time.monotonic()
        due = started
        while time.monotonic() - started < ATTACK_SECONDS:
            ok, took = handshake(r.port, pki, timeout=5)
            waits.append(took)
            failed += not ok
            if len(waits) % 40 == 0:  # every ~2 s, the established ones still answer
                echo_failures += sum(not echoes(s, len(waits)) for s in established)
            due += LEGIT_EVERY
            time.sleep(max(0.0, due - time.monotonic()))
        still_held = r.metric("active_connections")
        got = report(attack)
        total = len(waits)
        ok_share = (total - failed) / total
        worst = max(waits)
        figures = (
            f"legit {total - failed}/{total} ({100 * ok_share:.2f}%), worst wait {worst:.3f}s, "
            f"attacker opened {got['opened']} (router closed {got['closed_by_peer']}), "
            f"evicted {r.metric('hello_evicted_total')}, active at the end {still_held}"
        )
        print(figures)
        assert total >= 0.8 * ATTACK_SECONDS / LEGIT_EVERY, figures
        assert ok_share >= 0.99, figures
        assert worst <= 1.0, figures
        assert got["closed_by_peer"] > 2 * ATTACK_CAP, f"the attack never cycled: {figures}"
        # The connections relaying before the attack were never evicted, and still echo.
        assert echo_failures == 0
        assert all(echoes(s, 99) for s in established)
        line = r.wait_log(r"event=hello_evicted")
        assert " count=" in line and " max=200" in line


