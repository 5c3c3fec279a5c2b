"""What sits between the client and the origin: nothing, HAProxy, orama-sni-router, or the floor.

Each target is started fresh by a context manager and stopped by PID when it exits. HAProxy
gets the configuration an operator would write for SNI routing (the fair baseline);
orama-sni-router runs as shipped, from a full configuration with routes, limits, timeouts
and metrics, with its default number of workers. The floor (bench/floor.py) is the router's
data-path technique with nothing else, one process per CPU like the router: what a Python relay
costs here before it does any of the router's work.

Beside the default targets: `router-asyncio` is this checkout's router on the standard
library's event loop (ORAMA_LOOP=asyncio), and `base` the router of another commit
(`--base`, extracted into the run's temporary directory by bench.basecode), so a change is
measured against the code it replaces in the same run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.origin import SNI, Origin
from bench.procs import free_port, running, tail, wait_log, wait_port

TARGETS = ("direct", "haproxy", "router", "floor")  # a plain `python3 -m bench`
OPTIONAL_TARGETS = ("router-asyncio", "base")
ALL_TARGETS = TARGETS + OPTIONAL_TARGETS
ROOT = Path(__file__).resolve().parent.parent
BASE_DIR = "base-code"  # under the run's work directory: the `base` commit's tree
# Enough for W4's idle connections plus headroom, within a 20,000 open-file limit at two
# descriptors per routed connection.
PROXY_MAXCONN = 9950


@dataclass(frozen=True, slots=True)
class Endpoint:
    target: str
    host: str
    port: int
    pid: int | None  # the proxy's root process; None when there is no proxy


def haproxy_config(listen_port: int, origin: Origin, fallback_port: int) -> str:
    return f"""global
    maxconn {PROXY_MAXCONN}

defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s

frontend tls_in
    bind 127.0.0.1:{listen_port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend turn_tls if {{ req.ssl_sni -i cdn.example.com }}
    use_backend origin if {{ req.ssl_sni -i {SNI} }}
    default_backend fallback

backend origin
    server origin {origin.host}:{origin.port}

backend turn_tls
    server turn 127.0.0.1:1

backend fallback
    server caddy 127.0.0.1:{fallback_port}
"""


def router_config(
    listen_port: int, metrics_port: int, plain_port: int, origin: Origin, fallback_port: int
) -> str:
    # A node's real shape: the stealth TURN names, a wildcard, the bench origin as one more
    # exact route, a fallback, the plain-HTTP listener, and the shipped limits.
    o = f"{origin.host}:{origin.port}"
    return f"""listen: "127.0.0.1:{listen_port}"
client_hello_timeout: 5s
backend_dial_timeout: 5s
idle_timeout: 10m
drain_timeout: 5s
max_concurrent_conns: 10000
max_conns_per_ip: 0
non_tls: drop
metrics_listen: "127.0.0.1:{metrics_port}"
fallback:
  name: caddy
  addr: "127.0.0.1:{fallback_port}"
routes:
  - match: "cdn.example.com"
    backend: {{ name: turn-tls, addr: "127.0.0.1:5349" }}
  - match: "cdn-0123456789ab.example.com"
    backend: {{ name: turn-tls, addr: "127.0.0.1:5349" }}
  - match: "*.turn.example.com"
    backend: {{ name: turn-tls, addr: "127.0.0.1:5349" }}
  - match: "{SNI}"
    backend: {{ name: origin, addr: "{o}" }}
listeners:
  - name: http
    listen: "127.0.0.1:{plain_port}"
    mode: tcp
    backend: {{ name: caddy-http, addr: "{o}" }}
"""


def router_argv(config: Path, code: Path = ROOT) -> list[str]:
    """The router's command line, running the code under `code` (this checkout by default):
    the module is started from `code` whatever an editable install elsewhere points at."""
    module = ("orama_stealth.router.cli" if (code / "orama_stealth/router/cli.py").exists()
              else "orama_stealth.cli")  # before the router/ package existed
    run = f"import sys; from {module} import main; sys.exit(main())"
    # -P: the working directory (maybe another checkout) does not go first on sys.path.
    return [sys.executable, "-P", "-c", run, "--config", str(config)]


def router_env(code: Path = ROOT, loop: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    rest = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(code) + (os.pathsep + rest if rest else "")
    if loop is not None:
        env["ORAMA_LOOP"] = loop
    else:
        env.pop("ORAMA_LOOP", None)
    return env


@contextlib.contextmanager
def start(target: str, origin: Origin, workdir: Path, tag: str) -> Iterator[Endpoint]:
    if target == "direct":
        yield Endpoint(target, origin.host, origin.port, None)
        return
    port = free_port()
    # Nothing listens on the fallback: a hello routed there by mistake shows up as errors.
    fallback_port = free_port()
    log = workdir / f"{target}-{tag}.log"
    if target == "haproxy":
        cfg = workdir / f"haproxy-{tag}.cfg"
        cfg.write_text(haproxy_config(port, origin, fallback_port))
        argv = [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(cfg)]
        with running(argv, log) as proc:
            wait_port("127.0.0.1", port, proc, log)
            yield Endpoint(target, "127.0.0.1", port, proc.pid)
        return
    if target in ("router", "router-asyncio", "base"):
        code = workdir / BASE_DIR if target == "base" else ROOT
        if not (code / "orama_stealth").is_dir():
            raise RuntimeError(f"target {target}: no code under {code}")
        metrics = free_port()
        cfg = workdir / f"sni-router-{target}-{tag}.yaml"
        cfg.write_text(router_config(port, metrics, free_port(), origin, fallback_port))
        env = router_env(code, "asyncio" if target == "router-asyncio" else None)
        with running(router_argv(cfg, code), log, env) as proc:
            wait_port("127.0.0.1", port, proc, log)
            # Workers may still be binding after the first accept; the ready line means all are.
            if not wait_log(log, "event=ready", proc, 20.0) and proc.poll() is not None:
                raise RuntimeError(
                    f"orama-sni-router exited during start\n--- {log} ---\n{tail(log)}")
            wait_port("127.0.0.1", metrics, proc, log)
            yield Endpoint(target, "127.0.0.1", port, proc.pid)
        return
    if target == "floor":
        argv = [sys.executable, str(Path(__file__).with_name("floor.py")),
                "--listen", f"127.0.0.1:{port}", "--backend", f"{origin.host}:{origin.port}"]
        with running(argv, log) as proc:
            wait_port("127.0.0.1", port, proc, log)
            yield Endpoint(target, "127.0.0.1", port, proc.pid)
        return
    raise ValueError(f"unknown target {target!r}; expected one of {', '.join(ALL_TARGETS)}")
