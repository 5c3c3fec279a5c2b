"""probe --cert-truth against a real TLS server (Python's ssl on loopback) serving a chosen
leaf: identity by fingerprint, the days left, and the verdicts an operator reads."""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from orama_stealth.lab.pki import IssuedCert, TestCA
from orama_stealth.probe.cert_truth import compare, leaf_from_pem


@pytest.fixture
def ca() -> TestCA:
    return TestCA("cert-truth test CA")


@pytest.fixture
def server(ca: TestCA, tmp_path: Path) -> Iterator[tuple[int, IssuedCert]]:
    issued = ca.issue(["cdn.example.test"], tmp_path, "served", days=30)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(issued.cert_file, issued.key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], issued
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _probe(port: int, ca: Path, *args: str) -> tuple[int, dict[str, object]]:
    proc = subprocess.run(
        [sys.executable, "-m", "orama_stealth.stealth_cli", "probe", f"127.0.0.1:{port}",
         "--sni", "cdn.example.test", "--ca", str(ca), "--cert-truth", *args, "--json"],
        capture_output=True, text=True, timeout=60, check=False)
    report = json.loads(proc.stdout)
    check = next(c for c in report["checks"] if c["name"] == "cert-truth")
    return proc.returncode, check


def test_served_leaf_matches_and_reports_days_left(server: tuple[int, IssuedCert], ca: TestCA,
                                                   tmp_path: Path) -> None:
    port, issued = server
    ca_file = ca.write_ca(tmp_path / "ca.pem")
    code, check = _probe(port, ca_file, "--expect-cert", str(issued.cert_file))
    assert code == 0 and check["ok"], check
    leaf = leaf_from_pem(issued.cert_file.read_bytes())
    details = check["details"]
    assert isinstance(details, dict)
    assert details["served"]["serial"] == leaf.serial
    assert 29.9 < details["days_left"] <= 30


def test_other_certificate_fails_naming_both_serials_and_the_fix(
        server: tuple[int, IssuedCert], ca: TestCA, tmp_path: Path) -> None:
    port, issued = server
    newer = ca.issue(["cdn.example.test"], tmp_path / "new", "renewed")
    code, check = _probe(port, ca.write_ca(tmp_path / "ca.pem"), "--expect-cert",
                         str(newer.cert_file), "--cert-fix", "send SIGUSR2")
    served = leaf_from_pem(issued.cert_file.read_bytes()).serial
    expected = leaf_from_pem(newer.cert_file.read_bytes()).serial
    assert code == 1 and not check["ok"]
    error = str(check["error"])
    assert "cdn.example.test" in error and served in error and expected in error
    assert error.endswith("fix: send SIGUSR2")


def test_expiring_within_min_days_fails(server: tuple[int, IssuedCert], ca: TestCA,
                                        tmp_path: Path) -> None:
    port, _ = server
    code, check = _probe(port, ca.write_ca(tmp_path / "ca.pem"), "--cert-min-days", "31")
    assert code == 1 and check["step"] == "expiry" and "fewer than 31" in str(check["error"])
    code, check = _probe(port, ca.write_ca(tmp_path / "ca.pem"))  # default 14
    assert code == 0 and check["ok"]


def test_compare_is_pure(ca: TestCA, tmp_path: Path) -> None:
    leaf = leaf_from_pem(ca.issue(["a.test"], tmp_path, "a", days=10).cert_file.read_bytes())
    now = dt.datetime.now(dt.UTC)
    assert compare("a.test", leaf, leaf, 5, now, "x").ok
    assert not compare("a.test", leaf, None, 14, now, "x").ok
    assert compare("a.test", leaf, None, 14, now - dt.timedelta(days=5), "x").ok
