"""TLS through host:port with a chosen SNI: protocol, cipher, ALPN, chain, name, expiry."""

from __future__ import annotations

import socket
import ssl
from typing import Any

from orama_stealth.probe.certs import CertInfo, cert_info, covers
from orama_stealth.probe.model import CheckResult, ProbeFailure, ProbeSpec


def trust_label(spec: ProbeSpec) -> str:
    return f"CA file {spec.ca_file}" if spec.ca_file else "the system trust store"


def make_context(spec: ProbeSpec, verify: bool = True) -> ssl.SSLContext:
    """Verifies the chain; the name is checked separately so a mismatch can name both sides."""
    try:
        ctx = ssl.create_default_context(cafile=spec.ca_file)
    except (OSError, ssl.SSLError) as e:
        raise ProbeFailure("tls", f"cannot load {trust_label(spec)}: {e}") from e
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    if spec.alpn:
        ctx.set_alpn_protocols(list(spec.alpn))
    return ctx


def connect_tcp(spec: ProbeSpec, step: str) -> socket.socket:
    try:
        sock = socket.create_connection((spec.host, spec.port), timeout=spec.timeout)
    except TimeoutError:
        raise ProbeFailure(
            step, f"timeout after {spec.timeout}s connecting to {spec.target}"
        ) from None
    except OSError as e:
        raise ProbeFailure(step, f"cannot connect to {spec.target}: {e.strerror or e}") from e
    # Small STUN messages back to back: Nagle would hold the second one for the first's ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect_tls(spec: ProbeSpec, step: str, verify: bool = True) -> ssl.SSLSocket:
    """A TLS connection with the spec's SNI and ALPN; failures say which step and why."""
    ctx = make_context(spec, verify)
    raw = connect_tcp(spec, step)
    try:
        return ctx.wrap_socket(raw, server_hostname=spec.sni)
    except ssl.SSLCertVerificationError as e:
        raw.close()
        raise ProbeFailure(
            step, f"certificate chain does not validate against {trust_label(spec)}: "
            f"{e.verify_message}"
        ) from e
    except TimeoutError:
        raw.close()
        raise ProbeFailure(
            step, f"timeout after {spec.timeout}s in the TLS handshake with SNI {spec.sni!r}"
        ) from None
    except (ssl.SSLError, OSError) as e:
        raw.close()
        raise ProbeFailure(
            step, f"TLS handshake with SNI {spec.sni!r} failed: {e}"
        ) from e


def peer_chain(sock: ssl.SSLSocket) -> list[bytes]:
    """DER of every certificate the server sent, leaf first."""
    sslobj: Any = getattr(sock, "_sslobj", None)
    getter = getattr(sslobj, "get_unverified_chain", None)
    if getter is not None:
        chain = getter() or []
        return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]  # type: ignore[attr-defined]
    leaf = sock.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def describe_session(sock: ssl.SSLSocket) -> dict[str, Any]:
    cipher = sock.cipher()
    chain = [cert_info(der) for der in peer_chain(sock)]
    return {
        "protocol": sock.version(),
        "cipher": cipher[0] if cipher else None,
        "alpn": sock.selected_alpn_protocol(),
        "chain": [c.to_dict() for c in chain],
    }


def check_tls(spec: ProbeSpec) -> CheckResult:
    verify_error: str | None = None
    try:
        sock = connect_tls(spec, "tls")
    except ProbeFailure as e:
        if "does not validate" not in e.message:
            return CheckResult("tls", False, "TLS handshake failed", e.message, e.step)
        verify_error = e.message
        try:
            # Look again without verification so the report can show what was served.
            sock = connect_tls(spec, "tls", verify=False)
        except ProbeFailure as e2:
            return CheckResult("tls", False, "TLS handshake failed", e2.message, e2.step)
    with sock:
        details = describe_session(sock)
        leaf_der = peer_chain(sock)[:1]
    details["verified"] = verify_error is None
    details["trust"] = trust_label(spec)
    if not leaf_der:
        return CheckResult("tls", False, "no certificate", "the server sent no certificate",
                           "tls", details)
    leaf: CertInfo = cert_info(leaf_der[0])
    details["server_name"] = spec.server_name
    details["name_match"] = covers(leaf, spec.server_name)
    details["days_left"] = leaf.days_left
    summary = (
        f"{details['protocol']} {details['cipher']} alpn={details['alpn'] or '-'} "
        f"cert={','.join(leaf.names)} expires in {leaf.days_left}d"
    )
    if spec.alpn and details["alpn"] is None:
        details["alpn_note"] = f"offered {','.join(spec.alpn)}, the server chose none"
    if verify_error is not None:
        return CheckResult("tls", False, summary, verify_error, "tls", details)
    if not details["name_match"]:
        err = (
            f"certificate mismatch: {spec.server_name!r} is not on the certificate; "
            f"it covers {', '.join(leaf.names) or 'no names'} (subject {leaf.subject!r})"
        )
        return CheckResult("tls", False, summary, err, "tls", details)
    if leaf.days_left < spec.min_days:
        err = (f"the certificate expires in {leaf.days_left} days ({leaf.not_after:%Y-%m-%d}), "
               f"expected at least {spec.min_days}")
        return CheckResult("tls", False, summary, err, "tls", details)
    return CheckResult("tls", True, summary, None, None, details)
