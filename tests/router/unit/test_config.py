"""The config schema: the seed format loads unchanged; every rejection names file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from orama_stealth.router.config import ConfigError, load_config, parse_config, parse_duration

SEED = """\
listen: ":443"
client_hello_timeout: 5s
backend_dial_timeout: 5s
max_concurrent_conns: 10000
fallback:
  name: caddy
  addr: "127.0.0.1:8443"
routes:
  - match: "cdn.example.com"
    backend:
      name: turn-tls
      addr: "127.0.0.1:5349"
  - match: "cdn.ns-myapp.example.com"
    backend: { name: "turn-myapp", addr: "127.0.0.1:5349" }
"""


def test_seed_format_loads_unchanged(tmp_path: Path) -> None:
    f = tmp_path / "sni-router.yaml"
    f.write_text(SEED)
    cfg = load_config(f)
    assert cfg.path == str(f)
    (main,) = cfg.listeners
    assert (main.name, main.host, main.port, main.mode) == ("https", "", 443, "tls")
    assert cfg.client_hello_timeout == 5.0 and cfg.backend_dial_timeout == 5.0
    assert cfg.max_concurrent_conns == 10000
    assert (cfg.fallback.name, cfg.fallback.host, cfg.fallback.port) == ("caddy", "127.0.0.1", 8443)
    assert [(r.match, r.backend.name, r.backend.port, r.line) for r in cfg.routes] == [
        ("cdn.example.com", "turn-tls", 5349, 9),
        ("cdn.ns-myapp.example.com", "turn-myapp", 5349, 13),
    ]
    # Safe defaults for everything the seed does not say.
    assert cfg.max_conns_per_ip == 0
    assert cfg.idle_timeout == 600.0 and cfg.drain_timeout == 30.0
    assert cfg.half_close_timeout == 30.0
    assert cfg.non_tls == "drop" and cfg.workers == 0 and cfg.metrics_listen is None
    assert cfg.fallback.proxy_protocol is None


def test_full_format() -> None:
    cfg = parse_config(
        """
listen: "[::]:8443"
idle_timeout: 1m30s
drain_timeout: 250ms
half_close_timeout: 2s
max_conns_per_ip: 64
non_tls: fallback
workers: 3
metrics_listen: "127.0.0.1:9490"
fallback: {name: caddy, addr: "127.0.0.1:8443", proxy_protocol: v2}
routes:
  - {match: "*.Example.COM.", backend: {name: wild, addr: "[::1]:9000", proxy_protocol: v1}}
listeners:
  - name: http
    listen: ":80"
    mode: tcp
    backend: {name: caddy-http, addr: "127.0.0.1:8080", proxy_protocol: v1}
"""
    )
    assert cfg.listeners[0].host == "::" and cfg.listeners[0].port == 8443
    http = cfg.listeners[1]
    assert (http.name, http.mode, http.port) == ("http", "tcp", 80)
    assert http.backend is not None and http.backend.proxy_protocol == "v1"
    assert cfg.idle_timeout == 90.0 and cfg.drain_timeout == 0.25
    assert cfg.half_close_timeout == 2.0
    assert cfg.max_conns_per_ip == 64 and cfg.non_tls == "fallback" and cfg.workers == 3
    assert cfg.metrics_listen == ("127.0.0.1", 9490)
    assert cfg.fallback.proxy_protocol == "v2"
    (route,) = cfg.routes
    assert route.match == "*.example.com"
    assert (route.backend.host, route.backend.port) == ("::1", 9000)


@pytest.mark.parametrize(
    ("text", "line", "key", "words"),
    [
        (
            "fallback: {name: c, addr: '127.0.0.1:1'}\nlisten_typo: ':443'\n",
            2,
            "listen_typo",
            "unknown key",
        ),
        (
            "fallback: {name: c, addr: '127.0.0.1:1'}\nidle_timeout: 5 minutes\n",
            2,
            "idle_timeout",
            "expected a duration",
        ),
        (
            "fallback: {name: c, addr: '127.0.0.1:1'}\nidle_timeout: 0\n",
            2,
            "idle_timeout",
            "vanishes without a reset",
        ),
        (
            "fallback: {name: c, addr: '127.0.0.1:1'}\nclient_hello_timeout: 0s\n",
            2,
            "client_hello_timeout",
            "positive",
        ),
        ("fallback: {name: c, addr: 'localhost'}\n", 1, "fallback.addr", "expected host:port"),
        ("fallback: {name: c, addr: '127.0.0.1:70000'}\n", 1, "fallback.addr", "host:port"),
        ("fallback: {name: c, addr: '127.0.0.1:1'}\nlisten: 'x:y'\n", 2, "listen", "[host]:port"),
        ("fallback: {name: c}\n", 1, "fallback.addr", "missing"),
        ("listen: ':443'\n", 1, "fallback", "missing"),
        (
            "fallback: {name: c, addr: '127.0.0.1:1'}\nroutes:\n"
            "  - {match: a.example.com, backend: {name: t, addr: '127.0.0.1:2'}}\n"
            "  - {match: A.example.com., backend: {name: t, addr: '127.0.0.1:2'}}\n",
            4,
            "routes[1].match",
            "duplicate route 'a.example.com' (also on line 3)",
        ),
        (
            "fallback: {name: c, addr: '127.0.0.1:1'}\nroutes:\n"
            "  - {match: 'a.*.example.com', backend: {name: t, addr: '127.0.0.1:2'}}\n",
            3,
            "routes[0].match",
            "one leading wildcard label",
        ),
        (
            "fallback: {name: c, addr: '127.0.0.1:1'}\nroutes:\n"
            "  - {match: a.example.com, backend: {name: c, addr: '127.0.0.1:9'}}\n",
            3,
            "routes[0].backend.name",
            "defined differently on line 1",
        ),
        (
            "fallback: {name: c, addr: '127.0.0.1:1', proxy_protocol: v3}\n",
            1,
            "fallback.proxy_protocol",
            "expected one of v1, v2",
        ),
        (
            "fallback: {name: c, addr: '127.0.0.1:1'}\nmetrics_listen: '0.0.0.0:9490'\n",
            2,
            "metrics_listen",
            "loopback",
        ),
        (
            "fallback: {name: c, addr: '127.0.0.1:1'}\nmax_concurrent_conns: 0\n",
            2,
            "max_concurrent_conns",
            "expected 1..1000000",
        ),
        (
            "fallback: {name: c, addr: '127.0.0.1:1'}\nmax_conns_per_ip: ten\n",
            2,
            "max_conns_per_ip",
            "whole number",
        ),
        (
            "fallback: {name: c, addr: '127.0.0.1:1'}\nnon_tls: maybe\n",
            2,
            "non_tls",
            "expected one of drop, fallback",
        ),
        (
            "fallback: {name: c, addr: '127.0.0.1:1'}\n"
            "listeners:\n  - {name: http, listen: ':80'}\n",
            3,
            "listeners[0].backend",
            "tcp listener forwards",
        ),
        (
            "fallback: {name: c, addr: '127.0.0.1:1'}\nlisteners:\n"
            "  - {name: alt, listen: ':443', mode: tls}\n",
            1,
            "alt",
            "both use :443",
        ),
        (
            "fallback: {name: c, addr: '127.0.0.1:1'}\nfallback: {name: d, addr: '127.0.0.1:2'}\n",
            2,
            "fallback",
            "duplicate key (first set on line 1)",
        ),
        ("fallback: {name: c, addr: '127.0.0.1:1'\n", 2, "", "not valid YAML"),
        ("fallback: [1, 2]\n", 1, "fallback", "expected a mapping"),
    ],
)
def test_rejections_name_file_line_and_key(text: str, line: int, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/orama/sni-router.yaml")
    err = info.value
    assert (err.path, err.line, err.key) == ("/etc/orama/sni-router.yaml", line, key), str(err)
    assert words in err.message, str(err)
    prefix = f"/etc/orama/sni-router.yaml:{line}: " + (f"{key}: " if key else "")
    assert str(err).startswith(prefix)


def test_unreadable_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_config(empty)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5s", 5.0),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        (7, 7.0),
        (0.5, 0.5),
        ("1.5s", 1.5),
        ("100us", 1e-4),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "5 s", "5x", "1m 30s", True, None, "-5s"])
def test_bad_durations(text: object) -> None:
    assert parse_duration(text) is None


def test_backend_source_client_and_its_errors() -> None:
    cfg = parse_config('fallback: {name: caddy, addr: "127.0.0.1:8443"}\n'
                       'routes:\n'
                       '  - {match: cdn.a.test, backend: {name: turn, addr: "10.0.0.2:5350",'
                       ' source: client}}\n')
    assert cfg.routes[0].backend.source == "client"
    assert cfg.fallback.source == "router"
    with pytest.raises(ConfigError) as info:
        parse_config('fallback: {name: caddy, addr: "127.0.0.1:8443", source: clientip}\n',
                     "r.yaml")
    assert "fallback.source" in str(info.value) and "router, client" in str(info.value)
