"""REST credentials and the stealth host name."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from orama_stealth import turn_secret
from orama_stealth.wire import turn_auth


def test_rest_credential_matches_the_coturn_scheme() -> None:
    cred = turn_auth.rest_credential("s3cret", "alice", ttl=600, now=1_700_000_000)
    assert cred.username == "1700000600:alice"
    want = base64.b64encode(hmac.new(b"s3cret", b"1700000600:alice", hashlib.sha1).digest())
    assert cred.password == want.decode()
    assert (cred.ttl, cred.expires) == (600, 1_700_000_600)


def test_rest_credential_rejects_bad_input() -> None:
    with pytest.raises(turn_auth.CredentialError, match="ttl"):
        turn_auth.rest_credential("s", "alice", now=0, ttl=0)
    with pytest.raises(turn_auth.CredentialError, match="':'"):
        turn_auth.rest_credential("s", "a:b", now=0)


def test_gateway_response_puts_the_stealth_rung_last() -> None:
    cred = turn_auth.rest_credential("s", "u", now=0)
    body = turn_auth.gateway_response(cred, "turn.example.com", "cdn.example.com")
    assert body["uris"] == [
        "turn:turn.example.com:3478?transport=udp",
        "turn:turn.example.com:3478?transport=tcp",
        "turns:turn.example.com:5349",
        "turns:cdn.example.com:443",
    ]
    with pytest.raises(turn_auth.CredentialError, match="cdn host"):
        turn_auth.turn_uris("turn.example.com", "bad host!")


def test_stealth_host() -> None:
    digest = hashlib.sha256(b"myapp").hexdigest()[:12]
    assert turn_auth.stealth_host("myapp", "Example.COM.") == f"cdn-{digest}.example.com"
    assert turn_auth.stealth_host("other", "example.com") != turn_auth.stealth_host(
        "myapp", "example.com"
    )
    with pytest.raises(turn_auth.CredentialError, match="base domain"):
        turn_auth.stealth_host("myapp", "")


def test_read_secret(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text("  abc123  \n# ignored\n")
    assert turn_secret.read_secret(f) == "abc123"
    f.write_text("\n")
    with pytest.raises(turn_auth.CredentialError, match="empty"):
        turn_secret.read_secret(f)
    with pytest.raises(turn_auth.CredentialError, match="cannot read"):
        turn_secret.read_secret(tmp_path / "missing")
