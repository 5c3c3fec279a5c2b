"""Real browsers through :443 after the cutover: headless Debian chromium and firefox-esr.

Two relay-only RTCPeerConnections per browser whose only ICE server is
`turns:<name>:443?transport=tcp` with REST credentials from the lab's TURN secret; a data
channel carries 1 MiB each way. Every cdn name must connect over a relay candidate on TLS; the
base name (Caddy) must not. Test of the test: with the router's TURN backend on 127.0.0.1 the
TURN server sees every client as loopback, and Firefox fails while Chromium still connects.
Last, in the real-address mode (turn_source client) Firefox connects and the TURN server logs
the browser's own address for its sessions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support import browsers
from support import lab as lab_fixtures

from orama_stealth.turn_secret import read_secret
from orama_stealth.wire.turn_auth import rest_credential

lab_nodes = lab_fixtures.lab_nodes
lab_node = lab_fixtures.lab_node

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
_missing = browsers.missing()
pytestmark = [pytest.mark.lab, pytest.mark.slow,
              pytest.mark.skipif(_missing is not None, reason=_missing or "")]


def cutover(status_file: Path, *data: str) -> None:
    extra = [arg for d in data for arg in ("--data", d)]
    proc = subprocess.run(
        [sys.executable, "-m", "pyinfra", "-y", "inventories/lab.py", "deploys/cutover.py",
         *extra],
        cwd=REPO, env={**os.environ, "ORAMA_LAB_STATUS": str(status_file)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:]


def scenario(name: str, cred: Any, timeout_ms: int) -> dict[str, Any]:
    return {"name": name, "bytes": MIB, "timeoutMs": timeout_ms,
            "iceServers": [{"urls": [f"turns:{name}:443?transport=tcp"],
                            "username": cred.username, "credential": cred.password}]}


def assert_relayed_over_tls(result: dict[str, Any]) -> None:
    assert result["connected"], result
    assert result["local"]["type"] == "relay", result
    assert result["local"]["relayProtocol"] == "tls", result
    for way in ("aToB", "bToA"):
        assert result[way] == {"received": MIB, "firstMismatch": -1}, result


def test_chromium_and_firefox_relay_through_443(lab_node: Any, tmp_path: Path) -> None:
    st = lab_node.status()
    status_file = tmp_path / "lab-status.json"
    status_file.write_text(json.dumps(st))
    cutover(status_file)
    cred = rest_credential(read_secret(st["turn_secret_file"]), "browser-test",
                           now=time.time(), ttl=900)
    base, cdns = st["base_domain"], list(st["cdn_hosts"])
    names = [base, *cdns]
    # Chromium maps names itself (--host-resolver-rules) and takes the page from the host's
    # end of the lab link. Firefox's network.dns.forceResolve sends every connection, IP
    # literals included, to the node, so its page comes from the node: Caddy through :443.
    urls = {"firefox": f"https://{base}/health"}
    figures: list[str] = []
    with browsers.page_server(st["host_address"]) as host_page:
        for browser in ("chrome", "firefox"):
            results = browsers.run(
                browser, tmp_path / browser, st["ca_file"], st["address"], names,
                urls.get(browser, host_page),
                [scenario(n, cred, 5000 if n == base else 15000) for n in names])
            by_name = {r["name"]: r for r in results}
            for cdn in cdns:
                assert_relayed_over_tls(by_name[cdn])
                r = by_name[cdn]
                figures.append(f"{r['browserVersion']} {cdn}: connect {r['connectMs']} ms, "
                               f"1 MiB each way {r['transferMs']} ms")
            assert not by_name[base]["connected"], by_name[base]

        # Test of the test: the TURN backend on loopback, as before this fix.
        lab_node.ssh(f"sed -i 's/addr: \"{st['address']}:5349\"/addr: \"127.0.0.1:5349\"/' "
                     "/etc/orama/sni-router.yaml && systemctl reload orama-sni-router",
                     check=True)
        assert '"127.0.0.1:5349"' in lab_node.ssh("cat /etc/orama/sni-router.yaml").stdout
        time.sleep(0.5)
        firefox, = browsers.run("firefox", tmp_path / "firefox-loopback", st["ca_file"],
                                st["address"], names, urls["firefox"],
                                [scenario(cdns[0], cred, 6000)])
        assert not firefox["connected"], firefox
        chrome, = browsers.run("chrome", tmp_path / "chrome-loopback", st["ca_file"],
                               st["address"], names, host_page,
                               [scenario(cdns[0], cred, 15000)])
        assert_relayed_over_tls(chrome)

        # The real-address mode: the TURN server sees the browser's own address.
        cutover(status_file, "turn_source=client")
        since = lab_node.ssh("date +%s", check=True).stdout.strip()
        firefox, = browsers.run("firefox", tmp_path / "firefox-client", st["ca_file"],
                                st["address"], names, urls["firefox"],
                                [scenario(cdns[0], cred, 15000)])
        assert_relayed_over_tls(firefox)
        log = lab_node.ssh(f"journalctl -u coturn --no-pager --since @{since}",
                           check=True).stdout
        remotes = {line.split("remote ", 1)[1].split(",")[0].rsplit(":", 1)[0]
                   for line in log.splitlines() if "remote " in line}
        assert remotes == {st["host_address"]}, log[-2000:]
    print("FIGURES browsers: " + "; ".join(figures))
