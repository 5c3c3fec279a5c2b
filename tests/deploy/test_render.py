"""Every file the cutover writes, rendered and checked by the real tools (caddy 2.11 and
systemd-analyze on this machine), plus the merge rules that keep operator content."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from orama_stealth.deploy import render
from orama_stealth.deploy.ops import privileged_listeners
from orama_stealth.deploy.routercfg import RouterConfigMergeError, operator_routes, routes_yaml
from orama_stealth.deploy.settings import SettingsError, settings_from_data
from orama_stealth.lab.pki import TestCA
from orama_stealth.router.config import load_config, parse_config

CADDY = shutil.which("caddy")
ROUTER = shutil.which("orama-sni-router")
needs_caddy = pytest.mark.skipif(CADDY is None, reason="caddy not on PATH (scripts/bootstrap.sh)")

OPERATOR_PLAIN = """# the operator's own file
example.test {
\trespond "hello"
}
"""
OPERATOR_WITH_GLOBAL = """{
\temail ops@example.test
}

example.test {
\trespond "hello"
}
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("certs")
    issued = TestCA().issue(["example.test", "*.example.test"], d, "site")
    return str(issued.cert_file), str(issued.key_file)


def _settings(certs: tuple[str, str], **extra: object) -> render.NodeSettings:
    data: dict[str, object] = {"base_domain": "example.test", "tls_mode": "files",
                               "tls_cert_file": certs[0], "tls_key_file": certs[1],
                               "namespaces": ["myapp"]}
    data.update(extra)
    return settings_from_data("node-1", data)


def _caddy(tmp_path: Path, verb: str, text: str) -> subprocess.CompletedProcess[str]:
    assert CADDY is not None
    path = tmp_path / "Caddyfile"
    path.write_text(text)
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    return subprocess.run([CADDY, verb, "--adapter", "caddyfile", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, env=env, check=False)


@needs_caddy
@pytest.mark.parametrize("operator", [OPERATOR_PLAIN, OPERATOR_WITH_GLOBAL])
@pytest.mark.parametrize("proxy", [False, "v2"])
def test_caddyfile_validates_and_moves_caddy_off_privileged_ports(
    tmp_path: Path, certs: tuple[str, str], operator: str, proxy: object
) -> None:
    s = _settings(certs, proxy_protocol=proxy)
    text = render.caddyfile(s, operator)
    checked = _caddy(tmp_path, "validate", text)
    assert checked.returncode == 0, checked.stderr
    adapted = _caddy(tmp_path, "adapt", text)
    assert adapted.returncode == 0, adapted.stderr
    config = json.loads(adapted.stdout)
    http = config["apps"]["http"]
    assert (http["https_port"], http["http_port"]) == (8443, 8080)
    listens = {a for srv in http["servers"].values() for a in srv["listen"]}
    assert listens == {":8443"}
    assert privileged_listeners(adapted.stdout, "Caddyfile") == []
    hosts = {h for srv in http["servers"].values() for r in srv["routes"]
             for m in r.get("match", []) for h in m.get("host", [])}
    assert {"example.test", "cdn-c1b70247946b.example.test"} <= hosts
    wrappers = [w for srv in http["servers"].values() for w in srv.get("listener_wrappers", [])]
    assert any(w["wrapper"] == "proxy_protocol" for w in wrappers) == bool(proxy)


@needs_caddy
def test_explicit_port_sites_are_reported(tmp_path: Path, certs: tuple[str, str]) -> None:
    text = render.caddyfile(_settings(certs), OPERATOR_PLAIN + ':80 {\n\trespond "plain"\n}\n')
    adapted = _caddy(tmp_path, "adapt", text)
    assert adapted.returncode == 0, adapted.stderr
    problems = privileged_listeners(adapted.stdout, "/etc/caddy/Caddyfile")
    assert len(problems) == 1 and ":80" in problems[0] and "/etc/caddy/Caddyfile" in problems[0]


@pytest.mark.parametrize("operator", [OPERATOR_PLAIN, OPERATOR_WITH_GLOBAL])
def test_managed_blocks_are_idempotent_and_strip_back_to_the_operator_file(
    certs: tuple[str, str], operator: str
) -> None:
    s = _settings(certs)
    once = render.caddyfile(s, operator)
    assert render.caddyfile(s, once) == once
    assert render.strip_managed(once) == operator
    # Caddy allows one global options block: ours must merge into the operator's.
    assert once.splitlines().count("{") == 1
    assert ("email ops@example.test" in once) == ("email" in operator)


def test_router_config_and_operator_routes_survive(certs: tuple[str, str]) -> None:
    s = _settings(certs, cdn_hosts=["cdn.example.test"])
    first = render.router_config(s)
    cfg = parse_config(first, "sni-router.yaml")
    assert [r.match for r in cfg.routes] == ["cdn.example.test", "cdn-c1b70247946b.example.test"]
    assert cfg.fallback.addr == "127.0.0.1:8443"
    assert [(li.port, li.mode, li.backend and li.backend.addr) for li in cfg.listeners] == [
        (443, "tls", None), (80, "tcp", "127.0.0.1:8080")]
    edited = (first + '  - match: "shop.example.net"\n'
              '    backend: {name: shop, addr: "127.0.0.1:9000"}\n')
    kept = operator_routes(edited, "sni-router.yaml", set(s.cdn_hosts))
    assert [r["match"] for r in kept] == ["shop.example.net"]
    # A namespace dropped from the inventory takes its managed route with it.
    fewer = _settings(certs, cdn_hosts=["cdn.example.test"], namespaces=[])
    merged = render.router_config(fewer, routes_yaml(kept))
    assert [r.match for r in parse_config(merged).routes] == ["cdn.example.test",
                                                              "shop.example.net"]
    again = operator_routes(merged, "sni-router.yaml", set(fewer.cdn_hosts))
    assert render.router_config(fewer, routes_yaml(again)) == merged


def test_router_config_with_proxy_protocol_passes_the_router_check(
    tmp_path: Path, certs: tuple[str, str]
) -> None:
    path = tmp_path / "sni-router.yaml"
    path.write_text(render.router_config(_settings(certs, proxy_protocol="v1")))
    cfg = load_config(path)
    assert cfg.fallback.proxy_protocol == "v1"
    if ROUTER is not None:
        out = subprocess.run([ROUTER, "check", "--config", str(path)], capture_output=True,
                             text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        assert "cdn-c1b70247946b.example.test" in out.stdout + out.stderr


def test_unmergeable_router_config_is_named() -> None:
    with pytest.raises(RouterConfigMergeError, match=r"/etc/orama/sni-router.yaml: routes\[0\]"):
        operator_routes("routes:\n  - 42\n", "/etc/orama/sni-router.yaml", set())
    with pytest.raises(RouterConfigMergeError, match="not valid YAML"):
        operator_routes("routes: [\n", "/etc/orama/sni-router.yaml", set())


@pytest.mark.parametrize(("data", "message"), [
    ({}, "host n: base_domain: missing"),
    ({"base_domain": "a.test", "tls_mode": "files"}, "tls_cert_file: tls_mode files needs"),
    ({"base_domain": "a.test", "proxy_protocol": "v3"}, "proxy_protocol: expected v1, v2"),
    ({"base_domain": "a.test", "cdn_hosts": ["a.test"]}, "must stay with Caddy"),
    ({"base_domain": "a.test", "canary_soak": "soon"}, "canary_soak: expected seconds"),
    ({"base_domain": "a.test", "turn_tls_addr": "5349"}, "turn_tls_addr: expected host:port"),
    ({"base_domain": "a.test", "gateway_url": "https://a.test"}, "give both gateway_config"),
])
def test_bad_inventory_data_names_host_and_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        settings_from_data("n", data)


def test_stealth_names_derive_from_namespaces() -> None:
    s = settings_from_data("n", {"base_domain": "Example.TEST.", "namespaces": "myapp, other",
                                 "canary_soak": "24h"})
    assert s.cdn_hosts[0] == "cdn-c1b70247946b.example.test"
    assert len(s.cdn_hosts) == 2 and s.canary_soak == 86400.0


def _verify_units(unit_dir: Path, unit: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"}
    return subprocess.run(["systemd-analyze", "verify", str(unit_dir / unit)],
                          capture_output=True, text=True, timeout=60, env=env, check=False)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or ROUTER is None or CADDY is None,
                    reason="needs systemd-analyze, orama-sni-router and caddy")
def test_units_pass_systemd_analyze_verify(tmp_path: Path, certs: tuple[str, str]) -> None:
    assert ROUTER is not None and CADDY is not None
    s = _settings(certs)
    config = tmp_path / "sni-router.yaml"
    config.write_text(render.router_config(s))
    unit = render.router_unit(s, router_bin=ROUTER, config_path=str(config))
    (tmp_path / "orama-sni-router.service").write_text(unit)
    for fd_name in ("https", "http"):
        (tmp_path / f"orama-sni-router-{fd_name}.socket").write_text(render.router_socket(fd_name))
    # Debian's caddy.service, with this machine's caddy, to load the drop-in against.
    (tmp_path / "caddy.service").write_text(
        "[Unit]\nDescription=Caddy\nAfter=network.target network-online.target\n"
        f"[Service]\nType=notify\nExecStart={CADDY} run --environ --config /etc/caddy/Caddyfile\n"
        "AmbientCapabilities=CAP_NET_BIND_SERVICE\n[Install]\nWantedBy=multi-user.target\n")
    (tmp_path / "caddy.service.d").mkdir()
    (tmp_path / "caddy.service.d" / "orama-stealth.conf").write_text(render.caddy_dropin(s))
    for name in ("orama-sni-router.service", "orama-sni-router-https.socket",
                 "orama-sni-router-http.socket", "caddy.service"):
        out = _verify_units(tmp_path, name)
        assert out.returncode == 0, out.stderr
        ours = [line for line in out.stderr.splitlines() if str(tmp_path) in line]
        assert ours == [], ours
    for directive in ("Type=notify", "DynamicUser=yes", "NoNewPrivileges=yes",
                      "AmbientCapabilities=CAP_NET_BIND_SERVICE", "Before=caddy.service",
                      "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "ProtectSystem=strict",
                      f"ExecReload={ROUTER} reload --config {config}",
                      "RuntimeDirectory=orama-sni-router", "Restart=always",
                      "SystemCallFilter=@system-service"):
        assert directive in unit.splitlines()
    sockets = {f: render.router_socket(f) for f in ("https", "http")}
    assert "ListenStream=443" in sockets["https"] and "FileDescriptorName=https" in sockets["https"]
    assert "ListenStream=80" in sockets["http"] and "FileDescriptorName=http" in sockets["http"]
    # The names must be the router config's listener names, or the router binds on its own.
    names = {li.name for li in parse_config(render.router_config(s)).listeners}
    assert names == set(sockets)


def test_a_broken_unit_is_caught_by_the_same_check(tmp_path: Path) -> None:
    """The verify above can fail: a typo in a directive shows up as a line about our file."""
    (tmp_path / "x.service").write_text("[Service]\nExecStart=/bin/true\nProtectClock=maybe\n")
    out = _verify_units(tmp_path, "x.service")
    assert any(str(tmp_path) in line for line in out.stderr.splitlines())


def test_yaml_dump_keeps_operator_route_fields() -> None:
    route = {"match": "*.shop.example.net", "backend": {"name": "shop", "addr": "[::1]:9000",
                                                         "proxy_protocol": "v2"}}
    text = "routes:\n" + routes_yaml([route])
    assert yaml.safe_load(text) == {"routes": [route]}


@needs_caddy
def test_acme_ca_and_root_rendered_into_global_options(tmp_path: Path) -> None:
    root = tmp_path / "staging-root.pem"
    root.write_bytes(TestCA().cert_pem)
    s = settings_from_data("node-1", {
        "base_domain": "example.test", "tls_mode": "acme", "namespaces": ["myapp"],
        "acme_ca": "https://acme-staging.example.test/directory", "acme_ca_root": str(root),
    })
    for operator in (OPERATOR_PLAIN, OPERATOR_WITH_GLOBAL):
        adapted = _caddy(tmp_path, "adapt", render.caddyfile(s, operator))
        assert adapted.returncode == 0, adapted.stderr
        policies = json.loads(adapted.stdout)["apps"]["tls"]["automation"]["policies"]
        issuers = [i for p in policies for i in p.get("issuers", [])]
        assert issuers and all(i["ca"] == "https://acme-staging.example.test/directory"
                               and i["trusted_roots_pem_files"] == [str(root)]
                               for i in issuers), issuers
    plain = settings_from_data("node-1", {"base_domain": "example.test", "tls_mode": "acme"})
    assert "acme_ca" not in render.caddyfile(plain, OPERATOR_PLAIN)


@pytest.mark.parametrize(("data", "key", "expected"), [
    ({"acme_ca": "http://acme.example.test/dir"}, "acme_ca", "https:// URL"),
    ({"acme_ca": "acme.example.test"}, "acme_ca", "https:// URL"),
    ({"acme_ca_root": "/etc/ssl/root.pem"}, "acme_ca_root", "only together with acme_ca"),
    ({"acme_ca": "https://acme.example.test/dir", "acme_ca_root": "root.pem"},
     "acme_ca_root", "absolute path"),
])
def test_acme_keys_rejected_with_clear_errors(data: dict[str, object], key: str,
                                              expected: str) -> None:
    with pytest.raises(SettingsError) as err:
        settings_from_data("node-1", {"base_domain": "example.test", **data})
    assert f"host node-1: {key}:" in str(err.value) and expected in str(err.value)


@needs_caddy
def test_operator_site_for_a_cdn_name_is_not_duplicated(tmp_path: Path) -> None:
    s = settings_from_data("node-1", {"base_domain": "example.test", "tls_mode": "acme",
                                      "cdn_hosts": ["cdn.example.test", "cdn2.example.test"]})
    operator = OPERATOR_PLAIN + '\n# a "{" in a comment\ncdn.example.test {\n\trespond 404\n}\n'
    text = render.caddyfile(s, operator)
    checked = _caddy(tmp_path, "validate", text)
    assert checked.returncode == 0, checked.stderr  # no "ambiguous site definition"
    servers = json.loads(_caddy(tmp_path, "adapt", text).stdout)["apps"]["http"]["servers"]
    hosts = [h for srv in servers.values() for r in srv.get("routes", [])
             for m in r.get("match", []) for h in m.get("host", [])]
    assert sorted(hosts) == ["cdn.example.test", "cdn2.example.test", "example.test"]
    assert text.count("cdn2.example.test {") == 1 and text.count("cdn.example.test {") == 1


def test_turn_source_client_renders_the_unit_config_and_policy_routing(
    tmp_path: Path, certs: tuple[str, str]
) -> None:
    from orama_stealth.deploy import source_routing
    from orama_stealth.deploy.turn_target import resolved

    s = _settings(certs, turn_source="client")
    assert "CAP_NET_ADMIN" in render.router_unit(s)
    assert "CAP_NET_ADMIN" not in render.router_unit(_settings(certs))
    turn = source_routing.backend_addr("10.0.0.2:5349", s.turn_source)
    assert turn == "10.0.0.2:5350"
    cfg = parse_config(render.router_config(resolved(s, turn)))
    backends = {r.backend.addr: r.backend.source for r in cfg.routes}
    assert backends == {"10.0.0.2:5350": "client"}
    unit = source_routing.unit(s, "10.0.0.2:5349")
    assert ("ip rule add priority 4052 from 10.0.0.2 ipproto tcp sport 5350 lookup 4052"
            in unit)
    assert "ip route replace local default dev lo table 4052" in unit
    assert "ExecStop=-/usr/sbin/ip rule del priority 4052" in unit
    if shutil.which("systemd-analyze"):
        (tmp_path / source_routing.UNIT_NAME).write_text(unit)
        checked = _verify_units(tmp_path, source_routing.UNIT_NAME)
        assert checked.returncode == 0, checked.stderr
    with pytest.raises(SettingsError, match="turn_source: expected router or client"):
        _settings(certs, turn_source="clientip")
