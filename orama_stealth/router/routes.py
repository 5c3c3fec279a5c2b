"""The route table: which backend a ClientHello goes to.

Two dict lookups at most, whatever the number of routes, because `pick` runs for every HTTPS
connection on the node. A table is immutable; a reload builds a new one and swaps the reference,
so connections in flight never see a half-built table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from orama_stealth.router.config import Backend, Route, RouterConfig

# TLS-ALPN-01 challenges must reach Caddy even for names routed elsewhere (RFC 8737).
ACME_TLS_ALPN = "acme-tls/1"
RULE_FALLBACK = "fallback"
RULE_NO_SNI = "no-sni"
RULE_ACME = "acme-tls"


class RouteTable:
    __slots__ = ("_exact", "_fallback", "_wildcard", "routes")

    def __init__(self, routes: Iterable[Route], fallback: Backend) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)
        self._fallback = fallback
        self._exact: dict[str, tuple[Backend, str]] = {}
        # Keyed by the suffix after "*.", so a lookup strips one label and probes once.
        self._wildcard: dict[str, tuple[Backend, str]] = {}
        for r in self.routes:
            if r.match.startswith("*."):
                self._wildcard[r.match[2:]] = (r.backend, r.match)
            else:
                self._exact[r.match] = (r.backend, r.match)

    @classmethod
    def from_config(cls, cfg: RouterConfig) -> RouteTable:
        return cls(cfg.routes, cfg.fallback)

    @property
    def fallback(self) -> Backend:
        return self._fallback

    def pick(self, sni: str | None, alpn: Sequence[str] = ()) -> tuple[Backend, str]:
        """The backend for a hello and the rule that chose it (a route's match or a reason).

        `sni` is expected lowercased without a trailing dot, as the ClientHello reader returns it.
        """
        if alpn and ACME_TLS_ALPN in alpn:
            return self._fallback, RULE_ACME
        if sni is None:
            return self._fallback, RULE_NO_SNI
        hit = self._exact.get(sni)
        if hit is not None:
            return hit
        dot = sni.find(".")
        if dot > 0:
            hit = self._wildcard.get(sni[dot + 1 :])
            if hit is not None:
                return hit
        return self._fallback, RULE_FALLBACK

    def describe(self) -> list[tuple[str, str, str]]:
        """(match, backend name, backend address) in file order, the fallback last."""
        rows = [(r.match, r.backend.name, _target(r.backend)) for r in self.routes]
        rows.append(("*", self._fallback.name, _target(self._fallback)))
        return rows

    def __len__(self) -> int:
        return len(self.routes)


def _target(b: Backend) -> str:
    return f"{b.addr} proxy_protocol={b.proxy_protocol}" if b.proxy_protocol else b.addr
