"""Render the files the cutover writes, from `templates/` and the node's settings.

Pure functions (text in, text out), so tests check every rendered file with the real tools
without a node.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from orama_stealth.deploy import layout
from orama_stealth.deploy.caddysites import site_hosts
from orama_stealth.deploy.settings import NodeSettings

BEGIN = "# >>> orama-stealth managed {part}: written by deploys/cutover.py, removed by rollback"
END = "# <<< orama-stealth managed {part}"


def project_root() -> Path:
    """The checkout holding `templates/` and `pyproject.toml` (deploys run from a clone)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "templates").is_dir() or not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"{root}: expected an orama-stealth checkout with templates/ and pyproject.toml "
            "(run the deploys from a clone installed with `pip install -e .[deploy]`)"
        )
    return root


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(project_root() / "templates")),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template: str, **values: Any) -> str:
    return _env().get_template(template).render(**values)


def router_unit(s: NodeSettings, router_bin: str = layout.ROUTER_BIN,
                config_path: str = layout.ROUTER_CONFIG, drain_timeout: int = 30) -> str:
    return render(
        "orama-sni-router.service.j2",
        socket_units=list(layout.SOCKET_UNIT_NAMES),
        router_bin=router_bin,
        config_path=config_path,
        stop_timeout=f"{drain_timeout + 15}s",
        limit_nofile=max(65536, 2 * s.max_concurrent_conns + 1024),
        # IP_TRANSPARENT (binding the client's address) needs CAP_NET_ADMIN.
        extra_caps=" CAP_NET_ADMIN" if s.turn_source == "client" else "",
    )


def router_socket(fd_name: str) -> str:
    port = layout.SOCKETS[fd_name]
    return render("orama-sni-router.socket.j2", port=port, fd_name=fd_name, port_label=f":{port}")


def caddy_dropin(s: NodeSettings) -> str:
    return render("caddy-dropin.conf.j2", caddy_https_port=s.caddy_https_port,
                  caddy_http_port=s.caddy_http_port)


def _with_port(addr: str, port: int) -> str:
    return f"{addr.rpartition(':')[0]}:{port}"


def router_config(s: NodeSettings, operator_routes_yaml: str = "",
                  turn_ports: dict[str, int] | None = None) -> str:
    """`turn_ports`: cdn name -> the TLS port of the TURN listener of its own (tls_mode acme,
    see deploy/turnlisteners.py), on the host of `turn_tls_addr`; the other names go to
    `turn_tls_addr`, the main TURN server."""
    ports = turn_ports or {}
    routes = []
    for name in s.cdn_hosts:
        port = ports.get(name)
        if port is None:
            routes.append((name, "turn-tls", s.turn_tls_addr))
        else:
            # One backend name per address: the router's counters and logs stay unambiguous.
            routes.append((name, f"turn-tls-{port}", _with_port(s.turn_tls_addr, port)))
    return render(
        "sni-router.yaml.j2",
        managed_matches=list(s.cdn_hosts),
        managed_routes=routes,
        max_concurrent_conns=s.max_concurrent_conns,
        caddy_https_port=s.caddy_https_port,
        caddy_http_port=s.caddy_http_port,
        proxy_protocol=s.proxy_protocol,
        turn_tls_addr=s.turn_tls_addr,
        turn_source=s.turn_source,
        operator_routes_yaml=operator_routes_yaml.rstrip("\n"),
    )


def _block(part: str, body: str, indent: str = "") -> list[str]:
    lines = [indent + line if line.strip() else "" for line in body.rstrip("\n").split("\n")]
    return [BEGIN.format(part=part), *lines, END.format(part=part)]


def strip_managed(text: str) -> str:
    """The operator's Caddyfile with every managed block removed (rollback's fallback too)."""
    out: list[str] = []
    inside = False
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped.startswith("# >>> orama-stealth managed"):
            inside = True
            continue
        if stripped.startswith("# <<< orama-stealth managed"):
            inside = False
            continue
        if not inside:
            out.append(line)
    # Managed blocks leave their blank separator lines behind; drop them at both ends.
    result = "\n".join(out).strip("\n")
    return result + "\n" if result else ""


def _global_block_start(lines: list[str]) -> int | None:
    """Index of the line opening the operator's global options block, if the file has one."""
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        return i if stripped == "{" else None
    return None


def caddyfile(s: NodeSettings, current: str) -> str:
    """The operator's Caddyfile plus the managed global options and cdn sites.

    Caddy allows one global options block, first in the file: when the operator has one, the
    managed options go inside it; otherwise a managed global block is put first.
    """
    lines = strip_managed(current).split("\n")
    glob = render("caddy-global.j2", caddy_https_port=s.caddy_https_port,
                  caddy_http_port=s.caddy_http_port, proxy_protocol=s.proxy_protocol,
                  acme_ca=s.acme_ca, acme_ca_root=s.acme_ca_root)
    start = _global_block_start(lines)
    if start is None:
        lines = [*_block("global options", "{\n\t" + glob.rstrip("\n").replace("\n", "\n\t")
                         + "\n}"), "", *lines]
    else:
        lines[start + 1:start + 1] = _block("global options", glob, indent="\t")
    served = site_hosts(strip_managed(current))  # the operator's own cdn sites stay theirs
    sites = render("caddy-sites.j2", cdn_hosts=[n for n in s.cdn_hosts if n not in served],
                   tls_mode=s.tls_mode,
                   tls_cert_file=s.tls_cert_file, tls_key_file=s.tls_key_file)
    body = "\n".join(lines).rstrip("\n")
    return body + "\n\n" + "\n".join(_block("sites", sites.strip("\n"))) + "\n"


def sysctl_dropin() -> str:
    return ("# Written by the orama-stealth cutover; deploys/rollback.py removes it.\n"
            "# Caddy closes its old SO_REUSEPORT listener at every reload: the kernel moves the\n"
            "# connections still queued on it to the new listener instead of resetting them.\n"
            "net.ipv4.tcp_migrate_req = 1\n")
