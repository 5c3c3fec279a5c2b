"""Probes through a real orama-sni-router: cdn name -> coturn TLS, everything else -> Caddy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from probe.conftest import CDN, WWW
from support.servers import (
    CaddyServer,
    CoturnServer,
    RouterProcess,
    router_available,
    sni_router,
)

from orama_stealth.probe.model import ProbeSpec
from orama_stealth.probe.runner import run_probe

_missing = router_available()
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")


@pytest.fixture(scope="module")
def router(
    turn_server: CoturnServer, web_server: CaddyServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RouterProcess]:
    with sni_router(
        tmp_path_factory.mktemp("router"),
        {CDN: (turn_server.host, turn_server.tls_port)},
        (web_server.host, web_server.https_port),
    ) as r:
        yield r


def via(router: RouterProcess, ca_file: Path, sni: str, **kw: object) -> ProbeSpec:
    return ProbeSpec(router.host, router.port, sni=sni, ca_file=str(ca_file),
                     **kw)  # type: ignore[arg-type]


def test_turn_through_the_router(
    router: RouterProcess, turn_server: CoturnServer, ca_file: Path
) -> None:
    report = run_probe(via(router, ca_file, CDN, stun=True, turn=True,
                           turn_secret=turn_server.secret))
    assert report.ok, [(c.name, c.error) for c in report.checks]
    turn = report.check("turn")
    assert turn is not None
    assert turn.details["relay_round_trip"] is True
    tls = report.check("tls")
    assert tls is not None and CDN in tls.details["chain"][0]["names"], "coturn's certificate"


def test_turn_udp_peer_through_the_router(
    router: RouterProcess, turn_server: CoturnServer, ca_file: Path
) -> None:
    report = run_probe(via(router, ca_file, CDN, turn=True, turn_secret=turn_server.secret,
                           peer_mode="udp", peer_bind="127.0.0.1"))
    turn = report.check("turn")
    assert turn is not None and turn.ok, turn and turn.error


def test_wrong_secret_through_the_router(
    router: RouterProcess, turn_server: CoturnServer, ca_file: Path
) -> None:
    report = run_probe(via(router, ca_file, CDN, turn=True, turn_secret="wrong"))
    turn = report.check("turn")
    assert turn is not None and not turn.ok
    assert turn.step == "allocate" and "401" in (turn.error or "")


def test_https_through_the_router_reaches_caddy(
    router: RouterProcess, web_server: CaddyServer, ca_file: Path
) -> None:
    report = run_probe(via(router, ca_file, WWW, https=True, expect_server="Caddy"))
    assert report.ok, [(c.name, c.error) for c in report.checks]
    https = report.check("https")
    assert https is not None
    assert https.details["server"] == "Caddy"
    assert https.details["body"] == web_server.body


def test_unknown_name_through_the_router_is_a_mismatch(
    router: RouterProcess, ca_file: Path
) -> None:
    report = run_probe(via(router, ca_file, "nope.other.test", https=True))
    tls = report.check("tls")
    assert tls is not None and not tls.ok
    assert "certificate mismatch" in (tls.error or "")
    assert WWW in (tls.error or "")


def test_turn_on_the_web_route_is_not_a_turn_server(
    router: RouterProcess, ca_file: Path
) -> None:
    report = run_probe(via(router, ca_file, WWW, turn=True, turn_secret="x", timeout=1.0))
    turn = report.check("turn")
    assert turn is not None and not turn.ok
    assert "is not a TURN/STUN server" in (turn.error or ""), turn.error
