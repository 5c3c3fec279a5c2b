"""The probes that decide whether a node serves traffic, from this machine through :443 and :80.

Units being active proves nothing (the old router's checks were green while TURN on :443 was
dead): each check here dials the node and speaks the protocol a real client speaks.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import dataclass

from orama_stealth.deploy.settings import NodeSettings


@dataclass(frozen=True, slots=True)
class Outcome:
    probe: str  # e.g. "https lab.test via 10.0.0.2:443"
    ok: bool
    detail: str


def run_probe_cli(args: list[str], timeout: float = 60.0) -> tuple[bool, str]:
    """`orama-stealth probe ... --json` in a child process.

    A child keeps the probes out of pyinfra's gevent-patched interpreter (httpx's optional
    backends break under it) and is exactly what an operator runs by hand to re-check.
    """
    argv = [sys.executable, "-m", "orama_stealth.stealth_cli", "probe", *args, "--json"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return False, f"probe did not finish within {timeout:.0f}s"
    try:
        report = json.loads(proc.stdout)
        checks = report["checks"]
    except (ValueError, KeyError, TypeError):
        return False, (proc.stderr or proc.stdout).strip()[-500:] or f"exit {proc.returncode}"
    failed = [c for c in checks if not c.get("ok")]
    if failed or proc.returncode != 0 or not checks:
        return False, "; ".join(f"{c.get('name')}: {c.get('error') or c.get('summary')}"
                                for c in failed) or f"exit {proc.returncode}"
    return True, "; ".join(f"{c.get('name')}: {c.get('summary')}" for c in checks)


def _trust(s: NodeSettings) -> list[str]:
    return ["--ca", s.ca_file] if s.ca_file else []


def https_via_443(s: NodeSettings) -> Outcome:
    """The base domain reaches Caddy with a certificate valid for it."""
    name = f"https {s.base_domain} via {s.probe_address}:443"
    ok, detail = run_probe_cli([f"{s.probe_address}:443", "--sni", s.base_domain, *_trust(s),
                                "--https", "--expect-server", "Caddy"])
    return Outcome(name, ok, detail)


def turn_via_443(s: NodeSettings, cdn: str) -> Outcome:
    """The stealth name reaches the TURN server and a TURN allocation over TLS succeeds."""
    name = f"turn {cdn} via {s.probe_address}:443"
    if s.turn_secret_file is None:
        return Outcome(name, False, "turn_secret_file is not set in the inventory: cannot prove "
                       "a TURN allocation (a TLS handshake alone proves nothing)")
    ok, detail = run_probe_cli([f"{s.probe_address}:443", "--sni", cdn, *_trust(s), "--turn",
                                "--turn-secret-file", s.turn_secret_file])
    return Outcome(name, ok, detail)


def http_via_80(s: NodeSettings, timeout: float = 5.0) -> Outcome:
    """Plain HTTP on :80 (ACME HTTP-01, redirects) still gets an HTTP answer."""
    name = f"http {s.base_domain} via {s.probe_address}:80"
    request = (f"GET / HTTP/1.1\r\nHost: {s.base_domain}\r\nUser-Agent: orama-stealth-verify"
               "\r\nConnection: close\r\n\r\n").encode()
    try:
        with socket.create_connection((s.probe_address, 80), timeout=timeout) as sock:
            sock.sendall(request)
            head = sock.recv(256)
    except OSError as exc:
        return Outcome(name, False, f"connect/read failed: {exc}")
    status = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    if not status.startswith("HTTP/1."):
        return Outcome(name, False, f"expected an HTTP status line, got {status!r}")
    return Outcome(name, True, status)


def cutover_probes(s: NodeSettings) -> list[Outcome]:
    """Everything a cut-over node must do; every probe runs so the report is complete."""
    results = [https_via_443(s)]
    results += [turn_via_443(s, cdn) for cdn in s.cdn_hosts]
    results.append(http_via_80(s))
    return results


def caddy_probes(s: NodeSettings) -> list[Outcome]:
    """What a rolled-back node must do: Caddy itself serves :443 and :80."""
    return [https_via_443(s), http_via_80(s)]
