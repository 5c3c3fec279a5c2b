"""The optional gateway step: the stealth domain in the gateway's config, and proof that the
credentials it hands out end with the stealth rung `turns:<cdn>:443`."""

from __future__ import annotations

import shlex
from collections.abc import Iterator

import httpx
from pyinfra.context import host

from orama_stealth.deploy.facts import TextFile
from orama_stealth.deploy.settings import NodeSettings

STEALTH_KEY = "stealth_domain"
CREDENTIALS_PATH = "/v1/webrtc/turn/credentials"


def set_stealth_domain(s: NodeSettings) -> Iterator[str]:
    """`stealth_domain: <first cdn name>` as a top-level line of the gateway's YAML config."""
    assert s.gateway_config is not None
    current: str = host.get_fact(TextFile, path=s.gateway_config, _timeout=60) or ""
    wanted = f"{STEALTH_KEY}: {s.cdn_hosts[0]}"
    if wanted in current.splitlines():
        return
    path = shlex.quote(s.gateway_config)
    service = shlex.quote(str(host.data.get("gateway_service", "orama-gateway.service")))
    yield (f"if grep -q '^{STEALTH_KEY}:' {path}; then "
           f"sed -i 's|^{STEALTH_KEY}:.*|{wanted}|' {path}; "
           f"else printf '%s\\n' '{wanted}' >> {path}; fi && systemctl reload-or-restart {service}")


def check_credentials(s: NodeSettings, timeout: float = 10.0) -> str | None:
    """None when the gateway's credentials response lists turns:<cdn>:443 last."""
    assert s.gateway_url is not None
    url = s.gateway_url.rstrip("/") + CREDENTIALS_PATH
    try:
        verify: str | bool = s.ca_file or True
        r = httpx.post(url, json={}, timeout=timeout, verify=verify)
        r.raise_for_status()
        uris = r.json().get("uris")
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return f"POST {url} failed: {exc}"
    wanted = f"turns:{s.cdn_hosts[0]}:443"
    if not isinstance(uris, list) or not uris or uris[-1] != wanted:
        return f"POST {url}: expected uris to end with {wanted!r}, got {uris!r}"
    return None
