"""The HTTPS probe against a real Caddy, and the TURN probe against a web server."""

from __future__ import annotations

from pathlib import Path

from probe.conftest import WWW
from support.servers import CaddyServer

from orama_stealth.probe.model import ProbeSpec
from orama_stealth.probe.runner import run_probe


def test_https_sees_caddy(web_server: CaddyServer, ca_file: Path) -> None:
    report = run_probe(ProbeSpec(web_server.host, web_server.https_port, sni=WWW,
                                 ca_file=str(ca_file), https=True, expect_server="Caddy"))
    assert report.ok, [c.error for c in report.checks]
    https = report.check("https")
    assert https is not None
    assert https.details["status"] == 200
    assert https.details["server"] == "Caddy"
    assert https.details["body"] == web_server.body


def test_name_not_on_certificate_is_a_mismatch(web_server: CaddyServer, ca_file: Path) -> None:
    report = run_probe(ProbeSpec(web_server.host, web_server.https_port,
                                 sni="shop.other.test", ca_file=str(ca_file), https=True))
    assert not report.ok
    tls = report.check("tls")
    assert tls is not None and not tls.ok
    assert "certificate mismatch" in (tls.error or "")
    assert "'shop.other.test' is not on the certificate" in (tls.error or "")
    assert WWW in (tls.error or ""), "the message lists the names the certificate has"
    https = report.check("https")
    assert https is not None and not https.ok
    assert "certificate mismatch" in (https.error or "")


def test_turn_against_caddy_is_not_a_turn_server(web_server: CaddyServer, ca_file: Path) -> None:
    report = run_probe(ProbeSpec(web_server.host, web_server.https_port, sni=WWW,
                                 ca_file=str(ca_file), stun=True, turn=True,
                                 turn_secret="whatever", timeout=1.0))
    for name in ("stun", "turn"):
        check = report.check(name)
        assert check is not None and not check.ok
        assert "is not a TURN/STUN server" in (check.error or ""), check.error
        assert "HTTP" in (check.error or "")
        assert check.details["not_turn_server"] is True
    tls = report.check("tls")
    assert tls is not None and tls.ok


def test_alpn_is_offered_and_reported(web_server: CaddyServer, ca_file: Path) -> None:
    report = run_probe(ProbeSpec(web_server.host, web_server.https_port, sni=WWW,
                                 alpn=("h2", "http/1.1"), ca_file=str(ca_file)))
    tls = report.check("tls")
    assert tls is not None and tls.ok, tls and tls.error
    assert tls.details["alpn"] == "h2"
