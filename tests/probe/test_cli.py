"""`orama-stealth probe | credentials | stealth-host` as an operator runs them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from probe.conftest import CDN, WWW
from support.procs import free_port
from support.servers import CaddyServer, CoturnServer


def cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orama_stealth.stealth_cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def test_probe_turn_json_ok(turn_server: CoturnServer, ca_file: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(turn_server.secret + "\n")
    r = cli("probe", f"{turn_server.host}:{turn_server.tls_port}", "--sni", CDN, "--ca", ca_file,
            "--stun", "--turn", "--turn-secret-file", secret, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    body = json.loads(r.stdout)
    assert body["ok"] is True
    assert body["target"] == f"127.0.0.1:{turn_server.tls_port}"
    assert body["sni"] == CDN
    assert [c["name"] for c in body["checks"]] == ["tls", "stun", "turn"]
    for c in body["checks"]:
        assert set(c) == {"name", "ok", "summary", "error", "step", "details"}
        assert c["ok"] is True and c["error"] is None


def test_probe_wrong_secret_exits_1_with_the_reason(
    turn_server: CoturnServer, ca_file: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("wrong\n")
    r = cli("probe", f"{turn_server.host}:{turn_server.tls_port}", "--sni", CDN, "--ca", ca_file,
            "--turn", "--turn-secret-file", secret)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "turn   FAIL" in r.stdout
    assert "401" in r.stdout and turn_server.realm in r.stdout
    assert r.stdout.rstrip().endswith("result: FAILED")


def test_probe_https_table(web_server: CaddyServer, ca_file: Path) -> None:
    r = cli("probe", f"127.0.0.1:{web_server.https_port}", "--sni", WWW, "--ca", ca_file,
            "--https", "--expect-server", "Caddy")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Server: Caddy" in r.stdout
    assert r.stdout.rstrip().endswith("result: ok")


def test_probe_refused_port_exits_1(ca_file: Path) -> None:
    r = cli("probe", f"127.0.0.1:{free_port()}", "--ca", ca_file, "--json", "--timeout", "2")
    assert r.returncode == 1
    tls = json.loads(r.stdout)["checks"][0]
    assert tls["ok"] is False and "cannot connect" in tls["error"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["probe", "127.0.0.1:notaport"], "is not a number"),
        (["probe", "::1:443"], "[addr]:port"),
        (["probe", "127.0.0.1:443", "--turn"], "--turn-secret-file"),
        (["probe", "127.0.0.1:443", "--turn", "--turn-secret-file", "/nonexistent/secret"],
         "/nonexistent/secret: cannot read"),
    ],
)
def test_probe_usage_errors_exit_2(args: list[str], message: str) -> None:
    r = cli(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert r.stdout == ""


def test_credentials_json(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    before = int(time.time())
    r = cli("credentials", "--secret-file", secret, "--user", "alice", "--ttl", "600",
            "--turn-host", "turn.example.com", "--cdn-host", "cdn.example.com")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert set(body) == {"username", "password", "ttl", "uris"}
    expiry, user = body["username"].split(":")
    assert user == "alice" and before + 600 <= int(expiry) <= int(time.time()) + 600
    want = hmac.new(b"s3cret", body["username"].encode(), hashlib.sha1).digest()
    assert base64.b64decode(body["password"]) == want
    assert body["ttl"] == 600
    assert body["uris"] == [
        "turn:turn.example.com:3478?transport=udp",
        "turn:turn.example.com:3478?transport=tcp",
        "turns:turn.example.com:5349",
        "turns:cdn.example.com:443",
    ]


def test_credentials_are_accepted_by_coturn(
    turn_server: CoturnServer, ca_file: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(turn_server.secret)
    cred = json.loads(cli("credentials", "--secret-file", secret, "--user", "bob",
                          "--turn-host", "turn.example.test").stdout)
    r = cli("probe", f"127.0.0.1:{turn_server.tls_port}", "--sni", CDN, "--ca", ca_file,
            "--turn", "--turn-user", cred["username"], "--turn-password", cred["password"])
    assert r.returncode == 0, r.stdout + r.stderr
    password = tmp_path / "password"
    password.write_text(cred["password"] + "\n")
    r = cli("probe", f"127.0.0.1:{turn_server.tls_port}", "--sni", CDN, "--ca", ca_file,
            "--turn", "--turn-user", cred["username"], "--turn-password-file", password)
    assert r.returncode == 0, r.stdout + r.stderr


def test_credentials_missing_secret_file_exits_2(tmp_path: Path) -> None:
    r = cli("credentials", "--secret-file", tmp_path / "none", "--user", "a",
            "--turn-host", "turn.example.com")
    assert r.returncode == 2 and "cannot read the TURN shared secret" in r.stderr


def test_stealth_host() -> None:
    r = cli("stealth-host", "--namespace", "myapp", "--base", "example.com")
    assert r.returncode == 0
    assert r.stdout.strip() == f"cdn-{hashlib.sha256(b'myapp').hexdigest()[:12]}.example.com"
    r = cli("stealth-host", "--namespace", "myapp", "--base", "bad domain")
    assert r.returncode == 2 and "base domain" in r.stderr
