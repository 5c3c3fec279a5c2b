"""Certificates as production lives them, on a lab node whose Caddy uses a real ACME CA (the
lab's pebble, validating every challenge over the node's link): certificates before the
cutover, challenges through the router's :80 and :443, renewals reaching the TURN server
without breaking an allocation, a stale TURN certificate caught by verify, and the rollback."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from support.deploylab import Lab, changed

from orama_stealth.probe.turn_client import Allocation, TurnConnection, allocate
from orama_stealth.wire import turn_auth

RENEWAL_LIMIT = 60.0
pytestmark = [pytest.mark.lab, pytest.mark.slow]


class AcmeLab(Lab):
    """The lab driver with what the certificate checks need: the node's first cdn name,
    Caddy's certificates, renewals and the challenges Caddy used."""

    @property
    def cdn(self) -> str:
        return str(self.status["cdn_hosts"][0])

    def caddy_pem(self, name: str) -> bytes:
        return self.ssh(f"cat {self.node.caddy_cert_file(name)}").encode()

    def deploy(self, deploy: str, *data: str, limit: str | None = None,
               env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return super().deploy(deploy, *data, limit=limit, env=env, timeout=timeout)

    def probe(self, sni: str, *args: str) -> dict[str, Any]:  # type: ignore[override]
        return super().probe("--sni", sni, *args)

    def served(self, sni: str) -> x509.Certificate:
        ctx = ssl.create_default_context(cafile=str(self.status["ca_file"]))
        with socket.create_connection((self.address, 443), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=sni) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der
        return x509.load_der_x509_certificate(der)

    def renew(self, name: str, challenge: str) -> float:
        """Caddy obtains a new certificate for `name` using only `challenge`; returns the
        seconds until :443 serves it for that name."""
        old = self.caddy_serial(name)
        disable = {"http-01": "disable_tlsalpn_challenge",
                   "tls-alpn-01": "disable_http_challenge"}[challenge]
        acme = self.status["acme"]
        tls = (f"\\ttls {{\\n\\t\\tissuer acme {{\\n\\t\\t\\tdir {acme['directory']}\\n"
               f"\\t\\t\\ttrusted_roots {acme['directory_root']}\\n\\t\\t\\t{disable}\\n"
               "\\t\\t}\\n\\t}\\n")
        # The operator's own site for the stealth name (before the cutover it is how Caddy
        # got the certificate): only the chosen challenge is left to Caddy.
        self.ssh("sed -i '/^\\ttls {/,/^\\t}/d' /etc/caddy/Caddyfile && "
                 f"sed -i 's|^{self.cdn} {{$|&\\n{tls}|' /etc/caddy/Caddyfile && "
                 "caddy validate --adapter caddyfile --config /etc/caddy/Caddyfile >/dev/null 2>&1"
                 # Stopped before the files go: a Caddy still finishing an earlier order would
                 # otherwise write its certificate back, and the new Caddy would use it.
                 f" && systemctl stop caddy && rm -rf {self.node.caddy_cert_dir()}/{name}"
                 " && systemctl start caddy")
        # Done when Caddy holds a certificate newer than the one it had and :443 serves that
        # one: a copy still arriving from an earlier round must not count as this renewal.
        t0 = time.monotonic()
        while time.monotonic() - t0 < RENEWAL_LIMIT + 30:
            try:
                fresh = self.caddy_serial(name)
                if fresh not in (None, old) and self.served(name).serial_number == fresh:
                    return time.monotonic() - t0
            except (OSError, ssl.SSLError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"{name}: Caddy's new certificate not served after "
                             f"{RENEWAL_LIMIT + 30:.0f}s (was serial {old})")

    def caddy_serial(self, name: str) -> int | None:
        """The serial of the certificate Caddy holds for `name` now (None while it has none)."""
        proc = self.node.ssh(f"cat {self.node.caddy_cert_file(name)}")
        if proc.returncode != 0 or not proc.stdout.strip():
            return None
        return int(x509.load_pem_x509_certificate(proc.stdout.encode()).serial_number)

    def challenges_used(self, since: str) -> set[str]:
        # journald takes Caddy's lines from a stream: give a late one a few seconds.
        deadline = time.monotonic() + 10
        while True:
            out = self.ssh(f"journalctl -u caddy -o cat --since '{since}' | "
                           "grep -o '\"challenge_type\":\"[a-z0-9-]*\"' || true")
            used = {line.split('"')[3] for line in out.split()}
            if used or time.monotonic() > deadline:
                return used
            time.sleep(0.5)


@pytest.fixture
def acme_lab(lab_nodes: Any, tmp_path: Path, release_wheel: Path) -> AcmeLab:
    node = lab_nodes(acme=True)
    status = node.status()
    path = tmp_path / "lab-status.json"
    path.write_text(json.dumps(status))
    return AcmeLab(node, status, path, release_wheel)


def _issuer(cert: x509.Certificate) -> str:
    return cert.issuer.rfc4514_string()


def _open_allocation(lab: AcmeLab) -> Allocation:
    secret = Path(lab.status["turn_secret_file"]).read_text().strip()
    cred = turn_auth.rest_credential(secret, "acme-test", now=time.time(), ttl=900)
    ctx = ssl.create_default_context(cafile=str(lab.status["ca_file"]))
    raw = socket.create_connection((lab.address, 443), timeout=5)
    tls = ctx.wrap_socket(raw, server_hostname=lab.cdn)
    return allocate(TurnConnection(tls, f"{lab.address}:443", 5.0), cred.username, cred.password)


class HandshakeLoop:
    """New TLS handshakes to the stealth name through :443 every 50 ms in a thread (bounded
    in count and time): what TURN clients connecting during a renewal live through."""

    def __init__(self, lab: AcmeLab, max_count: int = 2000, max_seconds: float = 120) -> None:
        self.lab, self.max_count, self.max_seconds = lab, max_count, max_seconds
        self.ok = self.failed = 0
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        ctx = ssl.create_default_context(cafile=str(self.lab.status["ca_file"]))
        t_end = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and self.ok + self.failed < self.max_count \
                and time.monotonic() < t_end:
            t0 = time.monotonic()
            try:
                with socket.create_connection((self.lab.address, 443), timeout=3) as raw, \
                        ctx.wrap_socket(raw, server_hostname=self.lab.cdn):
                    self.ok += 1
            except (OSError, ssl.SSLError):
                self.failed += 1
            self.slowest = max(self.slowest, time.monotonic() - t0)
            self._stop.wait(0.05)

    def __enter__(self) -> HandshakeLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _relays(a: Allocation, b: Allocation) -> bool:
    a.create_permission(b.relayed)
    b.create_permission(a.relayed)
    payload = os.urandom(8).hex().encode()
    a.send_indication(b.relayed, payload)
    _, data = b.wait_data(5.0)
    return data == payload


@pytest.mark.timeout(900)  # one node through cutover, two renewals, verify twice, rollback
def test_acme_node_certificates_through_the_router(acme_lab: AcmeLab) -> None:
    lab = acme_lab
    base = str(lab.status["base_domain"])
    # Before the cutover: Caddy holds pebble certificates for the base and the stealth name.
    for name in (base, lab.cdn):
        stored = x509.load_pem_x509_certificate(lab.caddy_pem(name))
        assert "Pebble" in _issuer(stored), (name, _issuer(stored))
        san = stored.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [name]
    assert "Pebble" in _issuer(lab.served(base))

    cut = lab.deploy("cutover")
    assert cut.returncode == 0, cut.stdout[-3000:]
    assert lab.ssh("systemctl is-active orama-turn-cert.path orama-turn-cert.timer").split() \
        == ["active", "active"]
    rerun = lab.deploy("cutover")
    assert rerun.returncode == 0 and changed(rerun) == 0, rerun.stdout[-3000:]
    perms = lab.ssh("stat -c '%U:%G %a' /etc/orama/turn-tls /etc/orama/turn-tls/cert.pem "
                    "/etc/orama/turn-tls/key.pem").split()
    assert perms == ["root:turnserver", "750", "root:turnserver", "640",
                     "root:turnserver", "640"]

    # TURN through :443 with the stealth SNI; the certificate served is Caddy's, from pebble.
    expected = lab.status_file.with_name("caddy-cdn.pem")
    expected.write_bytes(lab.caddy_pem(lab.cdn))
    report = lab.probe(lab.cdn, "--turn", "--turn-secret-file", lab.status["turn_secret_file"],
                       "--expect-cert", str(expected))
    assert report["ok"] and [c["name"] for c in report["checks"]] == ["tls", "turn",
                                                                      "cert-truth"], report
    served = lab.served(lab.cdn)
    assert "Pebble" in _issuer(served)
    assert served.serial_number == x509.load_pem_x509_certificate(
        lab.caddy_pem(lab.cdn)).serial_number

    # Renewals through the router, each with one challenge type only, while an allocation
    # made before stays open; each new certificate must reach the TURN server within 60 s.
    before = _open_allocation(lab)
    peer = _open_allocation(lab)
    for challenge in ("tls-alpn-01", "http-01"):
        since = lab.ssh("date '+%Y-%m-%d %H:%M:%S'").strip()
        old_serial = lab.served(lab.cdn).serial_number
        with HandshakeLoop(lab) as loop:
            seconds = lab.renew(lab.cdn, challenge)
        print(f"renewal challenge={challenge} served_after_s={seconds:.1f} "
              f"handshakes={loop.ok} failed={loop.failed} slowest_s={loop.slowest:.3f}")
        assert loop.ok > 10 and loop.failed == 0
        assert seconds <= RENEWAL_LIMIT
        assert lab.challenges_used(since) == {challenge}
        new = lab.served(lab.cdn)
        assert new.serial_number != old_serial and "Pebble" in _issuer(new)
        assert before.refresh(600) == 600
        assert _relays(before, peer)

    verify = lab.deploy("verify")
    assert verify.returncode == 0, verify.stdout[-3000:]
    report = lab.probe(lab.cdn, "--cert-truth")
    days = report["checks"][-1]["details"]["days_left"]
    assert 89 < days <= 90, report

    # The reload mechanism disabled: Caddy renews, the TURN server keeps the old certificate,
    # and verify names the name, both serials and the fix.
    lab.ssh("systemctl stop orama-turn-cert.path orama-turn-cert.timer")
    stale = lab.served(lab.cdn).serial_number
    lab.ssh(f"rm -rf {lab.node.caddy_cert_dir()}/{lab.cdn} && systemctl restart caddy")
    lab.node.wait_certificates([lab.cdn], timeout=60)
    fresh = x509.load_pem_x509_certificate(lab.caddy_pem(lab.cdn)).serial_number
    assert fresh != stale and lab.served(lab.cdn).serial_number == stale
    verify = lab.deploy("verify")
    assert verify.returncode != 0
    out = verify.stdout
    assert lab.cdn in out and f"{stale:X}" in out and f"{fresh:X}" in out, out[-3000:]
    assert "systemctl start orama-turn-cert.service" in out
    lab.ssh("systemctl start orama-turn-cert.service")
    # coturn takes the new files on SIGUSR2, a moment after the oneshot returns.
    deadline = time.monotonic() + 15
    while lab.served(lab.cdn).serial_number != fresh and time.monotonic() < deadline:
        time.sleep(0.25)
    assert lab.served(lab.cdn).serial_number == fresh
    before.conn.close()
    peer.conn.close()

    # Rollback removes every piece and gives coturn its own certificate back.
    back = lab.deploy("rollback")
    assert back.returncode == 0, back.stdout[-3000:]
    left = lab.ssh("ls /etc/orama/turn-tls /usr/local/lib/orama-stealth/turn-cert-sync "
                   "/etc/systemd/system/orama-turn-cert.* 2>/dev/null; "
                   "grep -c orama-stealth /etc/turnserver.conf || true").split()
    assert left == ["0"], left
    conf = lab.ssh("grep -E '^(cert|pkey)=' /etc/turnserver.conf").split()
    assert conf == [f"cert={lab.status['node_files']['cdn_cert']}",
                    f"pkey={lab.status['node_files']['cdn_key']}"]
    assert lab.ssh("systemctl is-active coturn").strip() == "active"
    again = lab.deploy("rollback")
    assert again.returncode == 0
