"""Certificate truth: the leaf a server really presents for an SNI, against the one it should.

The TURN server reads its certificate at start and on SIGUSR2 only; when a renewal does not
reach it, TLS to the stealth name keeps working with the old certificate until the day it
expires, and then every `turns:` client fails while HTTPS looks healthy. This check compares
the served leaf (issuer, serial, not-after) with the certificate Caddy currently holds for that
name and reports the days left, so monitoring can alert long before that day.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from dataclasses import dataclass

from cryptography import x509

from orama_stealth.probe.model import CheckResult, ProbeSpec

DEFAULT_MIN_DAYS = 14


@dataclass(frozen=True, slots=True)
class Leaf:
    issuer: str
    serial: str  # hex, as openssl prints it
    not_after: dt.datetime
    fingerprint: str  # sha256 of the DER, hex

    def days_left(self, now: dt.datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400

    def to_dict(self, now: dt.datetime) -> dict[str, object]:
        return {"issuer": self.issuer, "serial": self.serial,
                "not_after": self.not_after.isoformat(),
                "days_left": round(self.days_left(now), 2), "sha256": self.fingerprint}


def leaf_from_cert(cert: x509.Certificate) -> Leaf:
    from cryptography.hazmat.primitives import hashes

    return Leaf(cert.issuer.rfc4514_string(), f"{cert.serial_number:X}",
                cert.not_valid_after_utc, cert.fingerprint(hashes.SHA256()).hex())


def leaf_from_pem(pem: bytes) -> Leaf:
    """The first certificate of a PEM chain (Caddy stores leaf first, then intermediates)."""
    return leaf_from_cert(x509.load_pem_x509_certificate(pem))


def served_leaf(host: str, port: int, sni: str | None, timeout: float) -> Leaf:
    """Whatever leaf the server presents; trust is the TLS check's job, identity is ours."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname=sni) as tls:
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("the server presented no certificate")
    return leaf_from_cert(x509.load_der_x509_certificate(der))


def compare(name: str, served: Leaf, expected: Leaf | None, min_days: float,
            now: dt.datetime, fix: str) -> CheckResult:
    """The verdict on already-fetched leaves (pure, so every branch is testable)."""
    details: dict[str, object] = {"name": name, "served": served.to_dict(now),
                                  "days_left": round(served.days_left(now), 2),
                                  "min_days": min_days}
    if expected is not None:
        details["expected"] = expected.to_dict(now)
    summary = (f"{name}: serial {served.serial} from {served.issuer}, not after "
               f"{served.not_after:%Y-%m-%d %H:%M}Z ({served.days_left(now):.1f} days left)")
    if expected is not None and served.fingerprint != expected.fingerprint:
        return CheckResult("cert-truth", False, summary, step="identity", details=details,
                           error=f"{name} serves serial {served.serial} (not after "
                           f"{served.not_after:%Y-%m-%d}) but the current certificate for it "
                           f"has serial {expected.serial} (not after "
                           f"{expected.not_after:%Y-%m-%d}); fix: {fix}")
    if served.days_left(now) < min_days:
        return CheckResult("cert-truth", False, summary, step="expiry", details=details,
                           error=f"{name}: the served certificate (serial {served.serial}) "
                           f"expires in {served.days_left(now):.1f} days, fewer than "
                           f"{min_days:g}; renew it")
    return CheckResult("cert-truth", True, summary, details=details)


def check_cert_truth(spec: ProbeSpec) -> CheckResult:
    name = spec.server_name
    now = dt.datetime.now(dt.UTC)
    expected = None
    if spec.expect_cert_file:
        try:
            with open(spec.expect_cert_file, "rb") as f:
                expected = leaf_from_pem(f.read())
        except (OSError, ValueError) as e:
            return CheckResult("cert-truth", False, f"{name}: no expected certificate",
                               error=f"{spec.expect_cert_file}: not a readable PEM "
                               f"certificate: {e}", step="expected")
    try:
        served = served_leaf(spec.host, spec.port, spec.sni, spec.timeout)
    except (OSError, ssl.SSLError, ValueError) as e:
        return CheckResult("cert-truth", False, f"{name}: no certificate",
                           error=f"TLS to {spec.target} with SNI {spec.sni}: {e}", step="tls")
    fix = spec.cert_fix or "make the server load the current certificate"
    return compare(name, served, expected, spec.cert_min_days, now, fix)
