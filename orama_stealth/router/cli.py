"""`orama-sni-router`: run the router in the foreground, `check` a config file, or `reload` the
running router and wait for the outcome.

Exit codes: 0 ok (including a drained stop), 2 config rejected, 1 cannot start (port busy,
inherited sockets unusable) or, for `reload`, the reload or the upgrade did not take effect.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from orama_stealth.router import build, status
from orama_stealth.router.config import ConfigError, RouterConfig, load_config
from orama_stealth.router.logs import Logger
from orama_stealth.router.routes import RouteTable

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_FAILED = 1
EXIT_CONFIG = 2
# Below systemd's own bound on ExecReload (TimeoutStartSec, 90 s by default), so the reason
# is printed by us rather than replaced by systemd's time-out.
RELOAD_TIMEOUT = 80.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orama-sni-router",
        description="Route TLS connections by SNI without terminating them.",
    )
    p.add_argument(
        "command", nargs="?", choices=("run", "check", "reload"), default="run",
        help="run (default): serve in the foreground; check: validate and print the route "
        "table; reload: validate, SIGHUP the running router, wait for its outcome",
    )
    p.add_argument("--config", "-c", required=True, help="path to sni-router.yaml")
    p.add_argument(
        "--runtime-dir", help="where the status file lives (default: $RUNTIME_DIRECTORY)"
    )
    p.add_argument("--pid", type=int, help="reload: the router's PID (default: $MAINPID)")
    p.add_argument(
        "--timeout", type=float, default=RELOAD_TIMEOUT,
        help=f"reload: seconds to wait for the outcome (default {RELOAD_TIMEOUT:g})",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {build.running()}")
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


def reload(args: argparse.Namespace) -> int:
    """SIGHUP the router and wait for the status file to report this reload's outcome."""
    pid = args.pid if args.pid is not None else int(os.environ.get("MAINPID", "0") or 0)
    if pid <= 0:
        print("reload: no router to signal (give --pid or set $MAINPID)", file=sys.stderr)
        return EXIT_FAILED
    directory = status.runtime_dir(args.runtime_dir)
    if directory is None:
        print("reload: no status file to wait on (give --runtime-dir or set "
              "$RUNTIME_DIRECTORY)", file=sys.stderr)
        return EXIT_FAILED
    before = status.read(directory)
    seen = before.generation if before is not None and before.pid == pid else -1
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as e:
        print(f"reload: cannot signal PID {pid}: {e}", file=sys.stderr)
        return EXIT_FAILED
    deadline = time.monotonic() + args.timeout
    while True:
        now = status.read(directory)
        if now is not None and now.pid == pid and now.generation > seen:
            if now.ok:
                print(f"reloaded: PID {pid} runs {now.version} build {now.build}"
                      f" (generation {now.generation})")
                return EXIT_OK
            print(f"reload failed: {now.error} (PID {pid} keeps running {now.version}"
                  f" build {now.build})", file=sys.stderr)
            return EXIT_FAILED
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"reload failed: PID {pid} exited", file=sys.stderr)
            return EXIT_FAILED
        except PermissionError:
            pass
        if time.monotonic() > deadline:
            print(f"reload: no outcome from PID {pid} within {args.timeout:g}s "
                  f"(see {Path(directory) / status.FILE})", file=sys.stderr)
            return EXIT_FAILED
        time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> int:
    build.running()  # fingerprint the code now, before anything on disk can change
    args = _parser().parse_args(argv)
    log = Logger()
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        if args.command in ("check", "reload"):
            print(str(e), file=sys.stderr)
        else:
            log.error("config_invalid", "configuration rejected", error=str(e))
        return EXIT_CONFIG
    if args.command == "reload":
        return reload(args)

    # `check` imports everything `run` does, so a build that cannot import fails its check
    # (the supervisor runs it before upgrading to a new build).
    from orama_stealth.router.handover import HandoverError
    from orama_stealth.router.sd import ListenFdsError
    from orama_stealth.router.supervisor import BindError, Supervisor

    if args.command == "check":
        print(describe(cfg))
        print(f"build: {build.running()}")
        return EXIT_OK

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        return Supervisor(cfg, log, status.runtime_dir(args.runtime_dir)).run()
    except (BindError, ListenFdsError, HandoverError) as e:
        log.error("start_failed", "cannot start", error=str(e))
        return EXIT_START_FAILED


if __name__ == "__main__":
    sys.exit(main())
