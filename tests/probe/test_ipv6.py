"""STUN and TURN over TLS to coturn on ::1: IPv6 XOR addresses from a real server."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from support.servers import coturn

from orama_stealth.lab.pki import TestCA
from orama_stealth.probe.model import ProbeSpec
from orama_stealth.probe.runner import run_probe


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_stun_and_turn_over_ipv6(ca: TestCA, tmp_path: Path) -> None:
    with coturn(tmp_path, ca, names=("cdn.example.test", "::1"),
                extra=["listening-ip=::1"]) as server:
        report = run_probe(ProbeSpec("::1", server.tls_port, sni="cdn.example.test",
                                     ca_file=str(server.ca_file), stun=True, turn=True,
                                     turn_secret=server.secret))
        assert report.ok, [(c.name, c.error) for c in report.checks]
        assert report.target == f"[::1]:{server.tls_port}"
        stun_check = report.check("stun")
        assert stun_check is not None
        assert stun_check.details["mapped"].startswith("[::1]:")
