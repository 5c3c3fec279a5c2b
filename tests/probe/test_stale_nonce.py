"""438 Stale Nonce from a real coturn whose nonces live one second."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from probe.conftest import CDN
from support.servers import CoturnServer, coturn

from orama_stealth.lab.pki import TestCA
from orama_stealth.probe.model import ProbeSpec
from orama_stealth.probe.tls_check import connect_tls
from orama_stealth.probe.turn_client import TurnConnection, allocate
from orama_stealth.wire import turn_auth


@pytest.fixture
def short_nonce_turn(ca: TestCA, tmp_path: Path) -> Iterator[CoturnServer]:
    with coturn(tmp_path, ca, names=(CDN,), extra=["stale-nonce=1"]) as server:
        yield server


def test_stale_nonce_is_refreshed_and_retried(short_nonce_turn: CoturnServer) -> None:
    server = short_nonce_turn
    spec = ProbeSpec(server.host, server.tls_port, sni=CDN, ca_file=str(server.ca_file))
    cred = turn_auth.rest_credential(server.secret, "nonce-test", now=time.time())
    conn = TurnConnection(connect_tls(spec, "connect"), spec.target, 5.0)
    try:
        alloc = allocate(conn, cred.username, cred.password)
        first_nonce = alloc.nonce
        time.sleep(2.5)  # let coturn's one-second nonce go stale
        alloc.create_permission(("127.0.0.1", 9))
        assert alloc.stale_nonces >= 1, "coturn should have answered 438 once"
        assert alloc.nonce != first_nonce
        assert alloc.refresh(0) == 0
    finally:
        conn.close()
