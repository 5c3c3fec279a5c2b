"""What a cutover needs to know about one node, read from pyinfra host data with clear errors.

Inventories hold plain dicts; every key is checked here once, so the operations downstream can
trust the values and an operator sees `host X: key Y: expected Z` instead of a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from orama_stealth.wire.turn_auth import CredentialError, stealth_host

TLS_MODES = ("files", "acme")
PROXY_VERSIONS = ("v1", "v2")
DEFAULT_CANARY_SOAK = 86400.0
STEPS = ("preflight", "backup", "install", "switch", "verify", "gateway")


class HostDataLike(Protocol):
    """pyinfra's HostData, or a plain dict in tests."""

    def get(self, key: str, default: Any = None) -> Any: ...


class SettingsError(ValueError):
    """Bad inventory data: the message names the host and the key."""


@dataclass(frozen=True, slots=True)
class NodeSettings:
    host: str
    base_domain: str
    cdn_hosts: tuple[str, ...]
    # where the router sends the stealth names: host:port on the node, or auto:PORT (found on
    # the node by deploy/turn_target.py: never loopback)
    turn_tls_addr: str
    probe_address: str  # where this machine reaches the node's :443 and :80
    caddyfile: str
    caddy_https_port: int
    caddy_http_port: int
    tls_mode: str
    tls_cert_file: str | None  # on the node, files mode only
    tls_key_file: str | None
    proxy_protocol: str | None
    ca_file: str | None  # on this machine: trust anchor for the probes (None = system store)
    turn_secret_file: str | None  # on this machine: the TURN REST secret for the allocation probe
    max_concurrent_conns: int
    gateway_config: str | None
    gateway_url: str | None
    canary_soak: float
    pause_after: str | None
    router_wheel: str | None  # on this machine: ship this wheel instead of building one
    acme_ca: str | None = None  # Caddy's ACME directory URL (None: Caddy's default CAs)
    acme_ca_root: str | None = None  # on the node: PEM root Caddy trusts for that directory
    turn_source: str = "router"  # "client": the TURN server sees clients' own addresses

    @property
    def turn_tls_port(self) -> int:
        return int(self.turn_tls_addr.rsplit(":", 1)[1])


def _err(host: str, key: str, msg: str) -> SettingsError:
    return SettingsError(f"host {host}: {key}: {msg}")


def _str(data: HostDataLike, host: str, key: str, default: str | None = None) -> str | None:
    value = data.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _err(host, key, f"expected a non-empty string, got {value!r}")
    return value.strip()


def _int(data: HostDataLike, host: str, key: str, default: int) -> int:
    value = data.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise _err(host, key, f"expected an integer, got {value!r}") from None
    if number <= 0:
        raise _err(host, key, f"expected a positive integer, got {value!r}")
    return number


def _names(data: HostDataLike, host: str, key: str) -> list[str]:
    value = data.get(key) or []
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _err(host, key, f"expected a list of names, got {value!r}")
    return [v.strip().lower().rstrip(".") for v in value]


def _addr(host: str, key: str, value: str) -> str:
    hostpart, sep, port = value.rpartition(":")
    if not sep or not hostpart or not port.isdigit() or not 0 < int(port) < 65536:
        raise _err(host, key, f"expected host:port, got {value!r}")
    return value


def _duration(host: str, key: str, value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip().lower()
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise _err(host, key, f"expected seconds or a duration like 24h, got {value!r}") from None


def settings_from_data(host: str, data: HostDataLike) -> NodeSettings:
    """Validate one host's data; `data` is pyinfra's merged host/group/--data view."""
    base = _str(data, host, "base_domain")
    if base is None:
        raise _err(host, "base_domain", "missing (the node's HTTPS name, e.g. example.com)")
    base = base.lower().rstrip(".")
    cdn = _names(data, host, "cdn_hosts")
    try:
        cdn += [stealth_host(ns, base) for ns in _names(data, host, "namespaces")]
    except CredentialError as exc:
        raise _err(host, "namespaces", str(exc)) from None
    if not cdn:
        cdn = [f"cdn.{base}"]
    cdn = list(dict.fromkeys(cdn))  # keep order, drop repeats
    if base in cdn:
        raise _err(host, "cdn_hosts", f"{base!r} is the base domain: it must stay with Caddy")

    tls_mode = _str(data, host, "tls_mode", "acme")
    if tls_mode not in TLS_MODES:
        raise _err(host, "tls_mode", f"expected one of {TLS_MODES}, got {tls_mode!r}")
    cert = _str(data, host, "tls_cert_file")
    key = _str(data, host, "tls_key_file")
    if tls_mode == "files" and (cert is None or key is None):
        raise _err(host, "tls_cert_file", "tls_mode files needs tls_cert_file and tls_key_file")

    proxy = data.get("proxy_protocol") or None
    if proxy is True:
        proxy = "v2"
    if proxy is not None and proxy not in PROXY_VERSIONS:
        raise _err(host, "proxy_protocol", f"expected v1, v2 or false, got {proxy!r}")

    pause = _str(data, host, "pause_after")
    if pause is not None and pause not in STEPS:
        raise _err(host, "pause_after", f"expected one of {STEPS}, got {pause!r}")

    gw_config = _str(data, host, "gateway_config")
    gw_url = _str(data, host, "gateway_url")
    if (gw_config is None) != (gw_url is None):
        raise _err(host, "gateway_config", "give both gateway_config and gateway_url, or neither")

    acme_ca, acme_ca_root = _acme(data, host)
    probe = _str(data, host, "probe_address") or _str(data, host, "ssh_hostname") or host
    return NodeSettings(
        host=host,
        base_domain=base,
        cdn_hosts=tuple(cdn),
        turn_tls_addr=_addr(host, "turn_tls_addr", _str(data, host, "turn_tls_addr",
                                                         "auto:5349") or ""),
        probe_address=probe,
        caddyfile=_str(data, host, "caddyfile", "/etc/caddy/Caddyfile") or "",
        caddy_https_port=_int(data, host, "caddy_https_port", 8443),
        caddy_http_port=_int(data, host, "caddy_http_port", 8080),
        tls_mode=tls_mode,
        tls_cert_file=cert,
        tls_key_file=key,
        proxy_protocol=proxy,
        ca_file=_str(data, host, "ca_file"),
        turn_secret_file=_str(data, host, "turn_secret_file"),
        max_concurrent_conns=_int(data, host, "max_concurrent_conns", 10000),
        gateway_config=gw_config,
        gateway_url=gw_url,
        canary_soak=_duration(host, "canary_soak",
                              data.get("canary_soak", DEFAULT_CANARY_SOAK)),
        pause_after=pause,
        router_wheel=_str(data, host, "router_wheel"),
        acme_ca=acme_ca,
        acme_ca_root=acme_ca_root,
        turn_source=_choice(host, "turn_source", _str(data, host, "turn_source", "router")),
    )


def _acme(data: HostDataLike, host: str) -> tuple[str | None, str | None]:
    """acme_ca must be an https directory URL; acme_ca_root an absolute path on the node and
    only with acme_ca (it is the trust anchor for that directory's HTTPS)."""
    ca = _str(data, host, "acme_ca")
    root = _str(data, host, "acme_ca_root")
    if ca is not None:
        parsed = urlsplit(ca)
        if parsed.scheme != "https" or not parsed.hostname or any(c.isspace() for c in ca):
            raise _err(host, "acme_ca", f"expected the https:// URL of an ACME directory "
                       f"(e.g. https://acme-staging-v02.api.letsencrypt.org/directory), "
                       f"got {ca!r}")
    if root is not None:
        if ca is None:
            raise _err(host, "acme_ca_root", "set only together with acme_ca (it is the root "
                       "Caddy trusts for that directory's HTTPS)")
        if not root.startswith("/") or any(c.isspace() for c in root):
            raise _err(host, "acme_ca_root", f"expected an absolute path of a PEM file on the "
                       f"node, got {root!r}")
    return ca, root


def _choice(host: str, key: str, value: str | None) -> str:
    if value not in ("router", "client"):
        raise _err(host, key, f"expected router or client, got {value!r}")
    return value
