"""Certificate facts for the report: names, expiry, and whether a name is covered."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID


@dataclass(frozen=True, slots=True)
class CertInfo:
    subject: str
    issuer: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_after: dt.datetime
    days_left: int

    @property
    def names(self) -> tuple[str, ...]:
        return self.dns_names + self.ip_addresses

    def to_dict(self) -> dict[str, object]:
        return {
            "subject": self.subject, "issuer": self.issuer, "names": list(self.names),
            "not_after": self.not_after.isoformat(), "days_left": self.days_left,
        }


def _cn(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else name.rfc4514_string()


def cert_info(der: bytes, now: dt.datetime | None = None) -> CertInfo:
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(i) for i in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    now = now or dt.datetime.now(dt.UTC)
    not_after = cert.not_valid_after_utc
    return CertInfo(
        _cn(cert.subject), _cn(cert.issuer), dns, ips, not_after,
        int((not_after - now).total_seconds() // 86400),
    )


def _dns_match(pattern: str, name: str) -> bool:
    p, n = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if p == n:
        return True
    # A wildcard covers exactly one whole left-most label (RFC 6125 6.4.3, no partial labels).
    if p.startswith("*.") and "*" not in p[2:]:
        head, _, rest = n.partition(".")
        return bool(head) and rest == p[2:]
    return False


def covers(info: CertInfo, name: str) -> bool:
    """Whether the leaf's SAN covers `name` (a DNS name or an IP address)."""
    try:
        ip = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return any(_dns_match(p, name) for p in info.dns_names)
    return any(ipaddress.ip_address(a) == ip for a in info.ip_addresses)
