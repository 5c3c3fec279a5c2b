"""`orama-sni-router`: run the router in the foreground, or `check` a config file.

Exit codes: 0 ok (including a drained stop), 2 config rejected, 1 cannot start (port busy,
inherited sockets unusable).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orama_stealth.router.config import ConfigError, RouterConfig, load_config
from orama_stealth.router.logs import Logger
from orama_stealth.router.routes import RouteTable

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orama-sni-router",
        description="Route TLS connections by SNI without terminating them.",
    )
    p.add_argument(
        "command", nargs="?", choices=("run", "check"), default="run",
        help="run (default): serve in the foreground; check: validate and print the route table",
    )
    p.add_argument("--config", "-c", required=True, help="path to sni-router.yaml")
    return p


def describe(cfg: RouterConfig) -> str:
    """The effective configuration as an operator wants to read it."""
    lines = [f"config: {cfg.path}"]
    for li in cfg.listeners:
        target = f" -> {li.backend.name} {li.backend.addr}" if li.backend is not None else ""
        proxy = (
            f" proxy_protocol={li.backend.proxy_protocol}"
            if li.backend is not None and li.backend.proxy_protocol
            else ""
        )
        lines.append(f"listener {li.name} {li.addr} mode={li.mode}{target}{proxy}")
    lines.append("routes (match -> backend address), first match wins, fallback last:")
    rows = RouteTable.from_config(cfg).describe()
    width = max(len(r[0]) for r in rows)
    lines.extend(f"  {m.ljust(width)} -> {name} {addr}" for m, name, addr in rows)
    lines.append(
        f"client_hello_timeout={cfg.client_hello_timeout:g}s"
        f" backend_dial_timeout={cfg.backend_dial_timeout:g}s"
        f" idle_timeout={cfg.idle_timeout:g}s drain_timeout={cfg.drain_timeout:g}s"
    )
    lines.append(
        f"max_concurrent_conns={cfg.max_concurrent_conns} max_conns_per_ip={cfg.max_conns_per_ip}"
        f" non_tls={cfg.non_tls} workers={cfg.workers or 'auto'}"
        f" metrics_listen={_hostport(cfg.metrics_listen)}"
    )
    return "\n".join(lines)


def _hostport(addr: tuple[str, int] | None) -> str:
    return f"{addr[0]}:{addr[1]}" if addr is not None else "off"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log = Logger()
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        if args.command == "check":
            print(str(e), file=sys.stderr)
        else:
            log.error("config_invalid", "configuration rejected", error=str(e))
        return EXIT_CONFIG
    if args.command == "check":
        print(describe(cfg))
        return EXIT_OK

    from orama_stealth.router.sd import ListenFdsError
    from orama_stealth.router.supervisor import BindError, Supervisor

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        return Supervisor(cfg, log).run()
    except (BindError, ListenFdsError) as e:
        log.error("start_failed", "cannot start", error=str(e))
        return EXIT_START_FAILED


if __name__ == "__main__":
    sys.exit(main())
