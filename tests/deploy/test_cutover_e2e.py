"""End to end against the lab node over SSH: `pyinfra -y inventories/lab.py deploys/...` run as
the operator runs it, then checked from outside with real probes and from inside with `ss`."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.deploylab import REPO, Lab, changed

from orama_stealth.lab.clientloop import ClientLoop

OPERATOR_ROUTE = ('  - match: "shop.example.net"\n'
                  '    backend: {name: shop, addr: "127.0.0.1:9000"}\n')

pytestmark = [pytest.mark.lab, pytest.mark.slow]
# coturn opens its listeners a moment after `systemctl restart` returns.
TURN_TLS_LISTENING = ("for i in $(seq 1 100); do ss -ltnH 'sport = :5349' | grep -q . && "
                      "break; sleep 0.1; done")


def measured(lab: Lab, deploy: str) -> subprocess.CompletedProcess[str]:
    """Run a deploy while a client opens a new TLS connection to :443 every 5 ms and holds
    five keep-alive ones: no connect may fail, no handshake may take over 500 ms."""
    with ClientLoop(lab.address, 443, lab.base, str(lab.status["ca_file"]), interval=0.005,
                    long_lived=5) as loop:
        proc = lab.deploy(deploy)
        time.sleep(0.3)
        held = loop.check_long_lived()
    summary = loop.summary()
    # Caddy's reload closes its idle keep-alive connections, so the long-lived ones end.
    print(f"FIGURES {deploy}: {summary.line()} long_lived={held}")
    assert proc.returncode == 0
    assert summary.attempts > 500, summary.line()
    assert summary.failed == 0, summary.line()
    assert summary.slowest_handshake < 0.5, summary.line()
    return proc


def assert_nothing_of_the_handover(lab: Lab) -> None:
    assert "orama_stealth_handover" not in lab.ssh("nft list tables")
    left = lab.node.ssh("ls /var/lib/orama-stealth/staging/caddy-handover.json "
                        "/var/lib/orama-stealth/staging/handover.nft "
                        "/var/lib/orama-stealth/staging/Caddyfile.restored")
    assert left.returncode != 0 and not left.stdout.strip(), left.stdout


def assert_cut_over(lab: Lab) -> None:
    assert_nothing_of_the_handover(lab)
    ports = lab.listeners()
    assert "caddy" not in ports.get(443, set()) and ports.get(443), ports
    # The socket unit's descriptor shows up as held by systemd too.
    assert ports[443] <= {"orama-sni-route", "python3", "python", "systemd"}, ports
    assert ports[443] & {"orama-sni-route", "python3", "python"}, ports
    assert "caddy" in ports.get(8443, set()) and "caddy" in ports.get(8080, set()), ports
    assert lab.ssh("systemctl is-active orama-sni-router.service").strip() == "active"
    # Caddy's reloads move queued connections to its new listener instead of resetting them.
    assert lab.ssh("cat /proc/sys/net/ipv4/tcp_migrate_req").strip() == "1"
    assert "tcp_migrate_req = 1" in lab.ssh("cat /etc/sysctl.d/60-orama-stealth.conf")
    base = lab.probe("--sni", lab.base, "--https", "--expect-server", "Caddy")
    assert base["ok"], base
    turn = lab.probe("--sni", f"cdn.{lab.base}", "--turn", "--turn-secret-file",
                     str(lab.status["turn_secret_file"]))
    assert turn["ok"], turn
    # The router dials the TURN server on the node address: it never sees a loopback client.
    assert f'addr: "{lab.address}:5349"' in lab.ssh("cat /etc/orama/sni-router.yaml")
    mapped = next(c for c in turn["checks"] if c["name"] == "turn")["details"]["mapped"]
    assert not mapped.startswith("127."), turn


def assert_compare_report(lab: Lab) -> None:
    """`probe --compare` through :443: what tells the cdn names apart from the base name."""
    cdns = [str(c) for c in lab.status["cdn_hosts"]]
    argv = [sys.executable, "-m", "orama_stealth.stealth_cli", "probe", f"{lab.address}:443",
            "--ca", str(lab.status["ca_file"]), "--compare", "--base", lab.base]
    for cdn in cdns:
        argv += ["--cdn", cdn]
    table = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    print(f"COMPARE\n{table}")
    report = json.loads(subprocess.run([*argv, "--json"], capture_output=True, text=True,
                                       timeout=60, check=True).stdout)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == [lab.base, *cdns]
    assert rows[lab.base]["tls version"] == "TLSv1.3"
    assert rows[lab.base]["http request over tls"].startswith("HTTP/1.1 200"), rows
    for cdn in cdns:
        assert "error" not in rows[cdn], rows[cdn]
        assert cdn in rows[cdn]["leaf names"], rows[cdn]
        # The TURN server never answers HTTP: an active prober can tell it apart.
        assert not rows[cdn]["http request over tls"].startswith("HTTP/"), rows[cdn]
    assert "http request over tls" in report["differences"]


def assert_before_state(lab: Lab) -> None:
    ports = lab.listeners()
    assert "caddy" in ports.get(443, set()) and "caddy" in ports.get(80, set()), ports
    assert 8443 not in ports and 8080 not in ports, ports
    gone = lab.node.ssh("systemctl is-active orama-sni-router.service "
                        "orama-sni-router-https.socket orama-sni-router-http.socket; "
                        "ls /etc/systemd/system/ | grep orama-sni-router")
    assert set(gone.stdout.split()) <= {"inactive", "unknown"} and gone.returncode != 0
    assert "orama-stealth managed" not in lab.ssh("cat /etc/caddy/Caddyfile")
    assert lab.node.ssh("test -e /etc/systemd/system/caddy.service.d/orama-stealth.conf"
                        ).returncode != 0
    assert lab.node.ssh("test -e /etc/sysctl.d/60-orama-stealth.conf").returncode != 0
    assert lab.ssh("cat /proc/sys/net/ipv4/tcp_migrate_req").strip() == "0"  # as it was
    assert_nothing_of_the_handover(lab)
    assert "cap_net_bind_service" in lab.ssh("systemctl show -P AmbientCapabilities caddy").lower()
    report = lab.probe("--sni", lab.base, "--https", "--expect-server", "Caddy")
    assert report["ok"], report


def test_cutover_rerun_canary_operator_route_and_rollback(lab: Lab) -> None:
    name = str(lab.status["name"])
    fleet = {"ORAMA_LAB_ROLE": "fleet"}
    # Preflight refuses what the node cannot do, before touching anything: Debian's Caddy 2.6
    # has no PROXY protocol listener.
    refused = lab.deploy("cutover", "proxy_protocol=v2")
    assert refused.returncode != 0
    assert "no caddy.listeners.proxy_protocol module" in refused.stdout
    assert lab.node.ssh("test -e /var/lib/orama-stealth/backups").returncode != 0
    # A loopback TURN backend would hide every client behind 127.0.0.1 (Firefox fails).
    refused = lab.deploy("cutover", "turn_tls_addr=127.0.0.1:5349")
    assert refused.returncode != 0
    assert "turn_tls_addr 127.0.0.1:5349 is a loopback address" in refused.stdout
    # ...and so does a TURN server whose TLS listener is on loopback only (cp -p: coturn's
    # user reads the file by its group).
    conf = "/etc/turnserver.conf"
    lab.ssh(f"cp -p {conf} {conf}.orig && sed -i '/^listening-ip={lab.address}$/d' {conf} && "
            f"systemctl restart coturn && {TURN_TLS_LISTENING}")
    refused = lab.deploy("cutover")
    lab.ssh(f"mv {conf}.orig {conf} && systemctl restart coturn && {TURN_TLS_LISTENING}")
    assert refused.returncode != 0
    assert "TLS port 5349 listens on loopback only (127.0.0.1)" in refused.stdout
    assert "listening-ip=<node address>" in refused.stdout
    assert lab.node.ssh("test -e /var/lib/orama-stealth/backups").returncode != 0
    assert_before_state(lab)
    # The canary rule: a fleet host is refused while the canary is not cut over...
    refused = lab.deploy("cutover", limit=f"{name}-fleet", env=fleet)
    assert refused.returncode != 0 and "is not cut over" in refused.stdout
    assert "caddy" in lab.listeners()[443]

    measured(lab, "cutover")
    assert_cut_over(lab)
    assert_compare_report(lab)
    state = json.loads(lab.ssh("cat /var/lib/orama-stealth/state.json"))
    assert state["state"] == "cutover"

    again = lab.deploy("cutover")
    assert again.returncode == 0 and changed(again) == 0
    watch = lab.deploy("verify")
    assert watch.returncode == 0 and changed(watch) == 0
    assert f"probe ok: turn cdn.{lab.base} via {lab.address}:443" in watch.stdout

    # ...and, once it is cut over, until it has soaked (checked live, over SSH and :443).
    early = lab.deploy("cutover", limit=f"{name}-fleet", env=fleet)
    assert early.returncode != 0 and "needs canary_soak=86400s" in early.stdout
    # The override lets it through (the same node: nothing left to change).
    soaked = lab.deploy("cutover", "canary_soak=0", limit=f"{name}-fleet", env=fleet)
    assert soaked.returncode == 0 and changed(soaked) == 0

    lab.ssh(f"printf '%s' '{OPERATOR_ROUTE}' >> /etc/orama/sni-router.yaml && "
            "systemctl reload orama-sni-router")
    kept = lab.deploy("cutover")
    assert kept.returncode == 0
    config = lab.ssh("cat /etc/orama/sni-router.yaml")
    assert 'shop.example.net' in config and f'"cdn.{lab.base}"' in config
    check = lab.ssh("/opt/orama/bin/orama-sni-router check --config /etc/orama/sni-router.yaml")
    assert "shop.example.net" in check
    assert changed(lab.deploy("cutover")) == 0

    measured(lab, "rollback")
    assert_before_state(lab)
    twice = lab.deploy("rollback")
    assert twice.returncode == 0 and changed(twice) == 0
    assert_before_state(lab)
    # Watching a rolled-back node reports what is missing: the stealth path is gone.
    watch = lab.deploy("verify")
    assert watch.returncode != 0
    assert f"probe FAILED: turn cdn.{lab.base} via {lab.address}:443" in watch.stdout


def _run_until_paused(lab: Lab, step: str, resume: Path | None = None) -> subprocess.Popen[str]:
    data = [f"pause_after={step}"] + ([f"pause_resume_file={resume}"] if resume else [])
    proc = subprocess.Popen(lab.argv("cutover", *data), cwd=REPO, env=lab.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    seen: list[str] = []
    for line in proc.stdout:
        seen.append(line)
        if f"paused after step={step}" in line:
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    proc.wait(timeout=30)
    raise AssertionError(f"cutover never paused after {step}:\n{''.join(seen)[-3000:]}")


def test_rollback_converges_after_a_cutover_killed_after_each_step(lab: Lab) -> None:
    # One node for every step: each case ends in the before state the next one starts from.
    for step in ("preflight", "backup", "install", "switch", "verify"):
        proc = _run_until_paused(lab, step)
        try:
            os.kill(proc.pid, signal.SIGKILL)  # really killed, between two operations
        finally:
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        back = lab.deploy("rollback")
        assert back.returncode == 0, (
            f"rollback after a cutover killed after {step}; the node's journal:\n"
            + lab.ssh("journalctl -n 60 -o short-precise --no-pager | grep -v sshd"))
        assert_before_state(lab)


DRAIN_TIMEOUT = 30.0  # the router's default, as the lab's config leaves it


def test_rollback_does_not_wait_for_the_connections_the_router_relays(lab: Lab) -> None:
    # A call in progress (TLS to the TURN server) and an idle HTTPS keep-alive, both relayed
    # by the router: the rollback neither waits drain_timeout for them nor leaves Caddy
    # without :443 while they end.
    assert lab.deploy("cutover").returncode == 0
    ctx = ssl.create_default_context(cafile=str(lab.status["ca_file"]))
    held = []
    try:
        for name in (lab.base, f"cdn.{lab.base}"):
            raw = socket.create_connection((lab.address, 443), timeout=10)
            held.append(ctx.wrap_socket(raw, server_hostname=name))
        held[0].sendall(f"GET / HTTP/1.1\r\nHost: {lab.base}\r\n\r\n".encode())
        assert held[0].recv(64).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        measured(lab, "rollback")
        took = time.monotonic() - start
    finally:
        for conn in held:
            conn.close()
    print(f"FIGURES rollback with 2 relayed connections open: {took:.1f}s")
    assert took < DRAIN_TIMEOUT - 5, f"the rollback waited for the router's drain: {took:.1f}s"
    assert_before_state(lab)


def test_failed_verify_rolls_back_and_exits_non_zero(lab: Lab, tmp_path: Path) -> None:
    # Preflight refuses a node whose TURN server is down, so coturn is stopped after it.
    resume = tmp_path / "resume"
    proc = _run_until_paused(lab, "preflight", resume)
    try:
        lab.ssh("systemctl stop coturn")
        resume.touch()
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    print(out[-4000:])
    assert proc.returncode != 0
    assert f"turn cdn.{lab.base} via {lab.address}:443" in out
    assert "cutover verify failed" in out and "Caddy serves :443 again" in out
    assert_before_state(lab)


def test_verify_seeing_a_loopback_mapped_address_rolls_back(lab: Lab, tmp_path: Path) -> None:
    # The deploy never writes a loopback TURN backend (preflight refuses one), so the installed
    # config is edited by hand between install and switch, as an operator might have done.
    resume = tmp_path / "resume"
    proc = _run_until_paused(lab, "install", resume)
    try:
        config = lab.ssh("cat /etc/orama/sni-router.yaml")
        assert f'addr: "{lab.address}:5349"' in config, config
        lab.ssh(f"sed -i 's/addr: \"{lab.address}:5349\"/addr: \"127.0.0.1:5349\"/' "
                "/etc/orama/sni-router.yaml")
        resume.touch()
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    print(out[-4000:])
    assert proc.returncode != 0
    assert f"probe FAILED: turn cdn.{lab.base} via {lab.address}:443" in out
    assert "saw this client as 127.0.0.1" in out and "Firefox rejects" in out
    assert "cutover verify failed" in out and "Caddy serves :443 again" in out
    assert_before_state(lab)


def test_real_address_mode_the_turn_server_sees_the_client(lab: Lab) -> None:
    done = lab.deploy("cutover", "turn_source=client")
    assert done.returncode == 0
    assert "source: client" in lab.ssh("cat /etc/orama/sni-router.yaml")
    assert "lookup 4052" in lab.ssh("ip rule show priority 4052")
    turn = lab.probe("--sni", f"cdn.{lab.base}", "--turn", "--turn-secret-file",
                     str(lab.status["turn_secret_file"]))
    assert turn["ok"], turn
    details = next(c for c in turn["checks"] if c["name"] == "turn")["details"]
    mapped = details["mapped"]
    # The probe runs on the host: the TURN server saw its own address and port.
    assert mapped == details["local"], turn
    assert mapped.startswith(f"{lab.status['host_address']}:"), turn
    log = lab.ssh("journalctl -u coturn --no-pager")
    assert f"remote {mapped}" in log, log[-2000:]
    again = lab.deploy("cutover", "turn_source=client")
    assert again.returncode == 0 and changed(again) == 0
    back = lab.deploy("rollback")
    assert back.returncode == 0
    assert "4052" not in lab.ssh("ip rule show")
    assert_before_state(lab)

