"""The handover's pieces without a node: Caddy's config on both port pairs, the redirect
rules, the scripts' shell syntax, preflight's refusal of a node without nft."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from orama_stealth.deploy import handover, scripts
from orama_stealth.deploy.facts import Snapshot
from orama_stealth.deploy.ops.preflight import preflight_problems
from orama_stealth.deploy.settings import settings_from_data

# What Debian 12's Caddy 2.6 adapts the lab node's Caddyfile to, before and after the cutover.
SITE = {"match": [{"host": ["lab.orama.test"]}], "handle": [{"handler": "static_response",
                                                               "status_code": 200}],
        "terminal": True}
OLD = {"apps": {"http": {"servers": {"srv0": {"listen": [":443"], "routes": [SITE]}}}}}
NEW = {"apps": {"http": {"http_port": 8080, "https_port": 8443,
                         "servers": {"srv0": {"listen": [":8443"], "routes": [SITE]}}}}}


def test_cutover_dual_config_adds_443_and_an_http_server_on_80() -> None:
    out = json.loads(handover.dual_config(json.dumps(NEW), 443, 80))
    servers = out["apps"]["http"]["servers"]
    assert servers["srv0"]["listen"] == [":8443", ":443"]
    extra = servers[handover.HANDOVER_HTTP_SERVER]
    assert extra["listen"] == [":80"] and extra["automatic_https"] == {"disable": True}
    location = extra["routes"][-1]["handle"][0]["headers"]["Location"]
    assert location == ["https://{http.request.host}{http.request.uri}"]
    assert out["apps"]["http"]["https_port"] == 8443  # Caddy's own ports are unchanged


def test_rollback_dual_config_keeps_http_sites_and_host_addresses() -> None:
    http_site = {"match": [{"host": ["plain.example"]}], "handle": [{"handler": "static_response",
                                                                     "status_code": 204}]}
    old = json.loads(json.dumps(OLD))
    old["apps"]["http"]["servers"]["srv0"]["listen"] = ["192.0.2.1:443"]
    old["apps"]["http"]["servers"]["srv1"] = {"listen": [":80"], "routes": [http_site]}
    out = json.loads(handover.dual_config(json.dumps(old), 8443, 8080))
    servers = out["apps"]["http"]["servers"]
    assert servers["srv0"]["listen"] == ["192.0.2.1:443", "192.0.2.1:8443"]
    assert servers["srv1"]["listen"] == [":80"]
    extra = servers[handover.HANDOVER_HTTP_SERVER]
    assert extra["listen"] == [":8080"] and extra["routes"][0] == http_site


@pytest.mark.parametrize("adapted, why", [
    ("not json", "no HTTP servers"),
    (json.dumps({"apps": {}}), "no HTTP servers"),
    (json.dumps({"apps": {"http": {"servers": {"srv0": {"listen": [":9000"]}}}}}),
     "no server of the adapted Caddyfile listens on its HTTPS port 443"),
])
def test_dual_config_refuses_what_it_cannot_double(adapted: str, why: str) -> None:
    with pytest.raises(handover.HandoverError, match=why):
        handover.dual_config(adapted, 8443, 8080)


@pytest.mark.skipif(shutil.which("caddy") is None, reason="needs caddy")
def test_caddy_accepts_the_dual_config(tmp_path: Path) -> None:
    path = tmp_path / "dual.json"
    path.write_text(handover.dual_config(json.dumps(NEW), 443, 80))
    out = subprocess.run(["caddy", "validate", "--config", str(path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.skipif(shutil.which("nft") is None or os.geteuid() != 0,
                    reason="needs nft and root (nft -c checks without changing anything)")
def test_nft_accepts_the_redirect_rules(tmp_path: Path) -> None:
    path = tmp_path / "rules.nft"
    path.write_text(handover.redirect_rules(8443, 8080))
    out = subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True,
                         timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    text = path.read_text()
    # Only new connections to this node, and only those whose first packet is a SYN.
    assert text.count("fib daddr type local tcp flags & (syn | ack) == syn") == 4


def test_scripts_are_valid_shell_and_always_delete_the_table() -> None:
    for script in (scripts.switch(8443, 8080), scripts.rollback("/etc/caddy/Caddyfile", "{}")):
        out = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True,
                             timeout=30, check=False)
        assert out.returncode == 0, out.stderr
        assert script.splitlines()[1].startswith(f"trap '{handover.delete_table()}")
        assert handover.DUAL_JSON in script.splitlines()[1]


def test_preflight_refuses_a_node_without_nft() -> None:
    s = settings_from_data("n1", {"base_domain": "example.org", "cdn_hosts": ["cdn.example.org"]})
    snap = Snapshot(caddy_active=True, listeners={443: {"caddy"}, 5349: {"turnserver"}})
    assert any("nft is not installed (apt-get install nftables)" in p
               for p in preflight_problems(s, snap))
    snap.nft = True
    assert not any("nft" in p for p in preflight_problems(s, snap))
