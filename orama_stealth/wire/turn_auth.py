"""TURN REST credentials (coturn `use-auth-secret`) and the stealth host name.

Username `<unix-expiry>:<user>`, password `base64(HMAC-SHA1(secret, username))`: the gateway
hands these out, coturn checks them with only the shared secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class CredentialError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TurnCredential:
    username: str
    password: str
    ttl: int
    expires: int


def rest_password(secret: str | bytes, username: str) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def rest_credential(
    secret: str | bytes, user: str, *, now: float, ttl: int = 600
) -> TurnCredential:
    """A credential valid for `ttl` seconds from `now` (the caller's clock, so this stays pure)."""
    if ttl <= 0:
        raise CredentialError(f"ttl must be a positive number of seconds, got {ttl}")
    if ":" in user:
        raise CredentialError(f"user must not contain ':' (it separates the expiry), got {user!r}")
    expires = int(now) + ttl
    username = f"{expires}:{user}"
    return TurnCredential(username, rest_password(secret, username), ttl, expires)


def _check_host(name: str, what: str) -> str:
    host = name.strip().lower().rstrip(".")
    labels = host.split(".")
    if not host or not all(_LABEL.match(label) for label in labels):
        raise CredentialError(f"{what}: expected a DNS name like example.com, got {name!r}")
    return host


def turn_uris(turn_host: str, cdn_host: str | None) -> list[str]:
    """The ladder browsers try in order; the stealth rung on :443 goes last."""
    h = _check_host(turn_host, "turn host")
    uris = [
        f"turn:{h}:3478?transport=udp",
        f"turn:{h}:3478?transport=tcp",
        f"turns:{h}:5349",
    ]
    if cdn_host:
        uris.append(f"turns:{_check_host(cdn_host, 'cdn host')}:443")
    return uris


def gateway_response(
    cred: TurnCredential, turn_host: str, cdn_host: str | None
) -> dict[str, object]:
    return {
        "username": cred.username,
        "password": cred.password,
        "ttl": cred.ttl,
        "uris": turn_uris(turn_host, cdn_host),
    }


def stealth_host(namespace: str, base: str) -> str:
    """`cdn-` + 12 hex of sha256(namespace) + `.` + base: one label, so `*.base` covers it,
    and the name does not tell an observer which namespace it serves."""
    if not namespace:
        raise CredentialError("namespace must not be empty")
    digest = hashlib.sha256(namespace.encode("utf-8")).hexdigest()[:12]
    return f"cdn-{digest}.{_check_host(base, 'base domain')}"
