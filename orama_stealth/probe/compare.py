"""What a censor sees: the base name and each cdn name on the same :443, side by side.

A passive observer sees the ClientHello, the ServerHello (version, cipher, ALPN) and, under
TLS 1.2, the server's certificate chain in clear; an active prober can also send an HTTP
request inside the TLS connection and look at the answer. Each difference between the base
name (Caddy) and a cdn name (the TURN server) tells the stealth name apart.
"""

from __future__ import annotations

import dataclasses
import ssl
from typing import Any

from orama_stealth.probe.model import ProbeFailure, ProbeSpec
from orama_stealth.probe.tls_check import connect_tls, describe_session

BROWSER_ALPN = ("h2", "http/1.1")
ROWS = ("tls version", "cipher", "alpn (offered h2,http/1.1)", "certificate in clear",
        "leaf names", "issuer", "chain", "http request over tls")


def _http_answer(spec: ProbeSpec, name: str) -> str:
    """The first line of the answer to `GET /` inside the TLS connection, or what happened."""
    try:
        sock = connect_tls(dataclasses.replace(spec, alpn=("http/1.1",)), "http", verify=False)
    except ProbeFailure as e:
        return f"no TLS: {e.message}"
    with sock:
        sock.settimeout(min(spec.timeout, 3.0))
        try:
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nUser-Agent: Mozilla/5.0\r\n"
                         "Connection: close\r\n\r\n".encode())
            data = sock.recv(200)
        except TimeoutError:
            return f"no answer within {min(spec.timeout, 3.0):.0f}s"
        except (ssl.SSLError, OSError) as e:
            return f"error: {e}"
    if not data:
        return "closed without a byte (close_notify)"
    return data.split(b"\r\n", 1)[0].decode("latin-1", "replace")


def observe(spec: ProbeSpec) -> dict[str, Any]:
    """One name: ServerHello, chain and the HTTP answer, as an observer would note them."""
    name = spec.sni or spec.host
    row: dict[str, Any] = {"name": name}
    try:
        sock = connect_tls(dataclasses.replace(spec, alpn=BROWSER_ALPN), "tls", verify=False)
    except ProbeFailure as e:
        return {**row, "error": e.message}
    with sock:
        session = describe_session(sock)
    chain = session["chain"]
    row.update({
        "tls version": session["protocol"],
        "cipher": session["cipher"],
        "alpn (offered h2,http/1.1)": session["alpn"] or "none",
        # TLS 1.3 encrypts the Certificate message; TLS 1.2 sends it for anyone to read.
        "certificate in clear": "no" if session["protocol"] == "TLSv1.3" else "yes",
        "leaf names": ", ".join(chain[0]["names"]) if chain else "-",
        "issuer": chain[0]["issuer"] if chain else "-",
        "chain": " <- ".join(c["subject"] for c in chain) or "-",
        "http request over tls": _http_answer(spec, name),
    })
    return row


def compare(host: str, port: int, base: str, cdns: list[str], ca_file: str | None,
            timeout: float) -> list[dict[str, Any]]:
    return [observe(ProbeSpec(host, port, sni=n, ca_file=ca_file, timeout=timeout))
            for n in [base, *cdns]]


def differences(rows: list[dict[str, Any]]) -> list[str]:
    """Rows where some cdn name differs from the base name."""
    base = rows[0]
    return [key for key in ROWS if any(r.get(key) != base.get(key) for r in rows[1:])]


def to_table(rows: list[dict[str, Any]]) -> str:
    headers = ["", *(r["name"] for r in rows)]
    body = [[key, *(str(r.get(key, r.get("error", "-"))) for r in rows)] for key in ROWS]
    diff = set(differences(rows))
    widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]
    out = []
    for line in [headers, *body]:
        mark = "*" if line[0] in diff else " "
        out.append(mark + " " + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
                   .rstrip())
    out.append("* differs between the base name and a cdn name: visible to an observer "
               "or an active prober")
    return "\n".join(out)


