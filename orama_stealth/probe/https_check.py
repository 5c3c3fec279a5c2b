"""An HTTPS request through host:port with the chosen SNI and Host, verified against the CA."""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from orama_stealth.probe.model import CheckResult, ProbeSpec
from orama_stealth.probe.tls_check import trust_label


def check_https(spec: ProbeSpec) -> CheckResult:
    try:
        ctx = ssl.create_default_context(cafile=spec.ca_file)
    except (OSError, ssl.SSLError) as e:
        return CheckResult("https", False, "no trust store",
                           f"cannot load {trust_label(spec)}: {e}", "https")
    ctx.set_alpn_protocols(["http/1.1"])
    host = f"[{spec.host}]" if ":" in spec.host else spec.host
    url = f"https://{host}:{spec.port}{spec.https_path}"
    name = spec.server_name
    headers = {"Host": name if spec.port == 443 else f"{name}:{spec.port}",
               "User-Agent": "orama-stealth-probe"}
    details: dict[str, Any] = {"url": url, "host_header": headers["Host"]}
    try:
        with httpx.Client(verify=ctx, timeout=spec.timeout, trust_env=False) as client:
            r = client.get(url, headers=headers, extensions={"sni_hostname": name})
    except httpx.TimeoutException as e:
        return CheckResult("https", False, "timeout",
                           f"timeout after {spec.timeout}s ({type(e).__name__}) for {url}",
                           "https", details)
    except httpx.HTTPError as e:
        text = str(e) or type(e).__name__
        if "CERTIFICATE_VERIFY_FAILED" in text and "match" in text.lower():
            text = f"certificate mismatch: the certificate does not cover {name!r} ({text})"
        return CheckResult("https", False, "request failed", text, "https", details)
    server = r.headers.get("server")
    details.update(status=r.status_code, server=server, http_version=r.http_version,
                   body=r.text[:200])
    summary = f"{r.status_code} {r.reason_phrase} Server: {server or '-'}"
    if r.status_code >= 500:
        return CheckResult("https", False, summary,
                           f"expected a status below 500, got {r.status_code}", "https", details)
    if spec.expect_server and spec.expect_server.lower() not in (server or "").lower():
        return CheckResult("https", False, summary,
                           f"expected a Server header containing {spec.expect_server!r}, "
                           f"got {server!r}", "https", details)
    return CheckResult("https", True, summary, None, None, details)
