"""Route selection: exact, one-label wildcards, fallback for no SNI and for ACME TLS-ALPN."""

from __future__ import annotations

from orama_stealth.router.config import Backend, Route
from orama_stealth.router.routes import RouteTable

CADDY = Backend("caddy", "127.0.0.1:8443", "127.0.0.1", 8443)
TURN = Backend("turn", "127.0.0.1:5349", "127.0.0.1", 5349)
WILD = Backend("wild", "127.0.0.1:9000", "127.0.0.1", 9000)


def table() -> RouteTable:
    return RouteTable(
        [Route("cdn.example.com", TURN, 1), Route("*.apps.example.com", WILD, 2)], CADDY
    )


def test_exact_and_wildcard() -> None:
    t = table()
    assert t.pick("cdn.example.com") == (TURN, "cdn.example.com")
    assert t.pick("x.apps.example.com") == (WILD, "*.apps.example.com")
    # A wildcard covers exactly one extra label, like DNS and certificates.
    assert t.pick("a.b.apps.example.com") == (CADDY, "fallback")
    assert t.pick("apps.example.com") == (CADDY, "fallback")
    assert t.pick("example.com") == (CADDY, "fallback")
    assert t.pick("other.example.org") == (CADDY, "fallback")


def test_no_sni_and_acme_go_to_fallback() -> None:
    t = table()
    assert t.pick(None) == (CADDY, "no-sni")
    assert t.pick("cdn.example.com", ("acme-tls/1",)) == (CADDY, "acme-tls")
    assert t.pick("cdn.example.com", ("h2", "http/1.1")) == (TURN, "cdn.example.com")


def test_exact_wins_over_wildcard() -> None:
    t = RouteTable([Route("*.example.com", WILD, 1), Route("cdn.example.com", TURN, 2)], CADDY)
    assert t.pick("cdn.example.com")[0] is TURN
    assert t.pick("www.example.com")[0] is WILD


def test_describe_lists_routes_then_fallback() -> None:
    assert table().describe() == [
        ("cdn.example.com", "turn", "127.0.0.1:5349"),
        ("*.apps.example.com", "wild", "127.0.0.1:9000"),
        ("*", "caddy", "127.0.0.1:8443"),
    ]


def test_lookup_does_not_scan_routes() -> None:
    # Counting work, not time: with 10,000 routes a pick must touch no route objects.
    routes = [Route(f"n{i}.example.com", TURN, i) for i in range(10_000)]
    routes += [Route(f"*.w{i}.example.com", WILD, i) for i in range(10_000)]
    t = RouteTable(routes, CADDY)
    assert len(t) == 20_000
    assert t.pick("n9999.example.com") == (TURN, "n9999.example.com")
    assert t.pick("x.w9999.example.com") == (WILD, "*.w9999.example.com")
    assert t.pick("x.y.w9999.example.com") == (CADDY, "fallback")
    # pick() only reads the two dicts: emptying the tuple of routes changes nothing.
    object.__setattr__(t, "routes", ())
    assert t.pick("n5000.example.com") == (TURN, "n5000.example.com")
