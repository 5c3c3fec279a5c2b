"""What a probe is asked to do and what it found."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ProbeInputError(ValueError):
    """The probe was asked something impossible (bad target, unreadable secret file)."""


class ProbeFailure(Exception):
    """One check failed at `step`; the message says what was expected and what came back."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


class NotTurnServer(ProbeFailure):
    """The peer answered, but not with STUN: wrong route, or a web server on that name."""


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    host: str
    port: int
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    ca_file: str | None = None          # None: the system trust store
    timeout: float = 5.0                # per network step
    min_days: int = 0                   # the leaf must stay valid at least this many days
    https: bool = False
    https_path: str = "/"
    expect_server: str | None = None    # e.g. "Caddy": the Server header must contain it
    stun: bool = False
    turn: bool = False
    turn_user: str | None = None        # static long-term credentials...
    turn_password: str | None = None
    turn_secret: str | None = None      # ...or a REST shared secret
    turn_rest_user: str = "orama-probe"
    peer_mode: str = "allocation"       # "allocation" | "udp"
    peer_bind: str | None = None        # UDP peer address for peer_mode "udp"
    cert_truth: bool = False            # report the served leaf; see probe/cert_truth.py
    expect_cert_file: str | None = None  # PEM whose leaf the server must present
    cert_min_days: float = 14.0         # cert-truth fails below this many days left
    cert_fix: str | None = None         # what to do when the served leaf is not the expected

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def server_name(self) -> str:
        """The name the certificate must cover: the SNI, or the host when none is sent."""
        return self.sni or self.host


@dataclass(slots=True)
class CheckResult:
    name: str
    ok: bool
    summary: str
    error: str | None = None
    step: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "ok": self.ok, "summary": self.summary,
            "error": self.error, "step": self.step, "details": self.details,
        }


@dataclass(slots=True)
class ProbeReport:
    target: str
    sni: str | None
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def check(self, name: str) -> CheckResult | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "sni": self.sni, "ok": self.ok,
            "checks": [c.to_dict() for c in self.checks],
        }


def parse_target(text: str, default_port: int = 443) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, or a bare host (port 443)."""
    t = text.strip()
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ProbeInputError(f"target {text!r}: expected [IPv6]:port")
        port_text = rest[1:] if rest else str(default_port)
    elif t.count(":") == 1:
        host, port_text = t.split(":")
    elif ":" in t:
        raise ProbeInputError(f"target {text!r}: write an IPv6 address as [addr]:port")
    else:
        host, port_text = t, str(default_port)
    if not host:
        raise ProbeInputError(f"target {text!r}: expected host:port, the host is empty")
    try:
        port = int(port_text)
    except ValueError:
        raise ProbeInputError(f"target {text!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ProbeInputError(f"target {text!r}: port {port} is outside 1-65535")
    return host, port
