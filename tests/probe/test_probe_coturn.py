"""The STUN and TURN probes against a real coturn over TLS on loopback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from probe.conftest import CDN
from support.servers import CoturnServer

from orama_stealth.probe.model import ProbeInputError, ProbeSpec
from orama_stealth.probe.runner import run_probe
from orama_stealth.wire import turn_auth


def spec(server: CoturnServer, ca_file: Path, **kw: object) -> ProbeSpec:
    base: dict[str, object] = {"sni": CDN, "ca_file": str(ca_file), "timeout": 5.0}
    base.update(kw)
    return ProbeSpec(server.host, server.tls_port, **base)  # type: ignore[arg-type]


@pytest.mark.parametrize("peer_mode", ["allocation", "udp"])
def test_turn_round_trip_with_rest_secret(
    turn_server: CoturnServer, ca_file: Path, peer_mode: str
) -> None:
    report = run_probe(spec(turn_server, ca_file, turn=True, turn_secret=turn_server.secret,
                            peer_mode=peer_mode))
    turn = report.check("turn")
    assert turn is not None
    assert turn.ok, turn.error
    assert report.ok
    d = turn.details
    assert d["realm"] == turn_server.realm
    assert d["relay_round_trip"] is True
    assert d["refresh_lifetime"] == 0
    host, port = d["relayed"].rsplit(":", 1)
    assert host == "127.0.0.1"
    assert turn_server.relay_ports[0] <= int(port) <= turn_server.relay_ports[1]
    if peer_mode == "udp":
        # The UDP peer saw datagrams from the relayed address itself.
        assert d["peer_saw_relay_as"] == d["relayed"]
    else:
        assert d["peer_relayed"] != d["relayed"]


def test_rest_credential_is_accepted_as_static_user(
    turn_server: CoturnServer, ca_file: Path
) -> None:
    cred = turn_auth.rest_credential(turn_server.secret, "alice", now=time.time(), ttl=300)
    report = run_probe(spec(turn_server, ca_file, turn=True, turn_user=cred.username,
                            turn_password=cred.password))
    turn = report.check("turn")
    assert turn is not None and turn.ok, turn and turn.error
    assert turn.details["username"] == cred.username


def test_expired_rest_credential_is_refused(turn_server: CoturnServer, ca_file: Path) -> None:
    cred = turn_auth.rest_credential(turn_server.secret, "alice", ttl=60, now=1_000_000)
    report = run_probe(spec(turn_server, ca_file, turn=True, turn_user=cred.username,
                            turn_password=cred.password))
    turn = report.check("turn")
    assert turn is not None and not turn.ok
    assert turn.step == "allocate"
    assert "401" in (turn.error or "")


def test_wrong_secret_is_a_clear_401(turn_server: CoturnServer, ca_file: Path) -> None:
    report = run_probe(spec(turn_server, ca_file, turn=True, turn_secret="not-the-secret"))
    assert not report.ok
    turn = report.check("turn")
    assert turn is not None and not turn.ok
    assert turn.step == "allocate"
    assert "401" in (turn.error or "")
    assert f"realm '{turn_server.realm}'" in (turn.error or "")
    assert "rejected the credentials" in (turn.error or "")
    tls = report.check("tls")
    assert tls is not None and tls.ok, "the TLS part was fine; only the credential was wrong"


def test_stun_binding(turn_server: CoturnServer, ca_file: Path) -> None:
    report = run_probe(spec(turn_server, ca_file, stun=True))
    stun_check = report.check("stun")
    assert stun_check is not None and stun_check.ok, stun_check and stun_check.error
    assert stun_check.details["mapped"].startswith("127.0.0.1:")
    assert stun_check.details["fingerprint"] is True


def test_tls_details_from_coturn(turn_server: CoturnServer, ca_file: Path) -> None:
    tls = run_probe(spec(turn_server, ca_file)).check("tls")
    assert tls is not None and tls.ok, tls and tls.error
    assert tls.details["verified"] is True
    assert tls.details["name_match"] is True
    assert tls.details["chain"][0]["names"] == [CDN, "127.0.0.1"]
    assert 80 <= tls.details["days_left"] <= 90
    assert tls.details["protocol"].startswith("TLSv1.")


def test_wrong_ca_fails_chain_validation(
    turn_server: CoturnServer, tmp_path: Path
) -> None:
    from orama_stealth.lab.pki import TestCA

    other = TestCA("some other CA").write_ca(tmp_path / "other.pem")
    report = run_probe(spec(turn_server, other, turn=True, turn_secret=turn_server.secret))
    tls = report.check("tls")
    assert tls is not None and not tls.ok
    assert "does not validate" in (tls.error or "")
    assert tls.details["chain"][0]["names"] == [CDN, "127.0.0.1"], "shows what was served"
    turn = report.check("turn")
    assert turn is not None and not turn.ok and "does not validate" in (turn.error or "")


def test_nothing_listening_says_which_step(ca_file: Path) -> None:
    from support.procs import free_port

    report = run_probe(ProbeSpec("127.0.0.1", free_port(), sni=CDN, ca_file=str(ca_file),
                                 turn=True, turn_secret="x", timeout=2))
    tls = report.check("tls")
    assert tls is not None and not tls.ok and "cannot connect" in (tls.error or "")
    turn = report.check("turn")
    assert turn is not None and turn.step == "connect"


def test_turn_without_credentials_is_an_input_error(
    turn_server: CoturnServer, ca_file: Path
) -> None:
    with pytest.raises(ProbeInputError, match="shared secret or a static user"):
        run_probe(spec(turn_server, ca_file, turn=True))
