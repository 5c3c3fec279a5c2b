"""Preflight and backup: every reason not to touch a node, checked before any change, then a
copy of every file the cutover changes."""

from __future__ import annotations

import json

from pyinfra.api.operation import operation
from pyinfra.context import host

from orama_stealth.deploy import caddyaccount, layout, runlog, scripts, turnlisteners
from orama_stealth.deploy.canary import CanaryRefusal, check_canary
from orama_stealth.deploy.facts import Snapshot
from orama_stealth.deploy.ops.common import (
    EXPECTED_ERRORS,
    Commands,
    executing,
    failure,
    guarded,
    listener_plan,
    new_caddyfile,
    new_router_config,
    run,
    settings,
    sh,
    snapshot,
    stage,
    turn_tls_target,
)
from orama_stealth.deploy.routercfg import RouterConfigMergeError
from orama_stealth.deploy.settings import NodeSettings
from orama_stealth.deploy.source_routing import backend_addr
from orama_stealth.deploy.turn_target import answers_tls
from orama_stealth.router.config import ConfigError, parse_config


def preflight_problems(s: NodeSettings, snap: Snapshot) -> list[str]:
    """Every reason not to touch this node; checked before any change."""
    problems: list[str] = []
    rerun = snap.backup is not None or snap.router_active
    if not rerun:
        if not snap.caddy_active:
            problems.append("caddy.service is not active (systemctl status caddy)")
        elif not snap.caddy_on(443):
            owners = ", ".join(sorted(snap.owners(443))) or "nothing"
            problems.append(f"Caddy is not serving :443 (listening there: {owners})")
    if not snap.listeners.get(s.turn_tls_port):
        problems.append(f"the TURN server's TLS port {s.turn_tls_port} is not listening "
                        f"(turn_tls_addr {s.turn_tls_addr})")
    for port in (s.caddy_https_port, s.caddy_http_port):
        others = snap.owners(port) - {"caddy"}
        if others:
            problems.append(f"port {port} (Caddy's new port) is taken by {', '.join(others)}")
    if not snap.nft:
        problems.append("nft is not installed (apt-get install nftables): the switch redirects "
                        "new connections with it so none is refused while :443/:80 change hands")
    if s.proxy_protocol and not snap.caddy_proxy_protocol:
        problems.append("proxy_protocol is enabled in the inventory but this node's Caddy has no "
                        "caddy.listeners.proxy_protocol module (caddy list-modules); use a Caddy "
                        "build with it or set proxy_protocol: false")
    return problems


# Validate as the user caddy.service runs as, so unreadable certificate files show up here.
AS_CADDY = ('runuser -u "$(systemctl show -P User caddy.service | grep . || echo root)" --')


def privileged_listeners(adapted_json: str, caddyfile: str) -> list[str]:
    """Sites with an explicit :443/:80 address would keep those ports (https_port/http_port
    only move the defaults), so Caddy would fail to start behind the router."""
    try:
        servers = json.loads(adapted_json)["apps"]["http"]["servers"]
    except (ValueError, KeyError, TypeError):
        return [f"`caddy adapt {caddyfile}` gave no HTTP servers to inspect"]
    bad = sorted({addr for srv in servers.values() for addr in srv.get("listen", [])
                  if addr.rsplit(":", 1)[-1] in ("443", "80")})
    if not bad:
        return []
    return [f"{caddyfile} has sites bound explicitly to {', '.join(bad)}; after the cutover the "
            "router owns :443/:80, so write those site addresses without a port (e.g. "
            "`example.com` or `http://example.com`) and let https_port/http_port place them"]


@operation()
def preflight() -> Commands:
    """Fail before any change: Caddy on :443 (or a re-run), TURN TLS listening, Caddy's new
    ports free, the canary soaked, and both new configs accepted by the real tools."""
    if not executing():
        return
    runlog.pause_here("preflight")
    try:
        problems = _problems(settings())
    except EXPECTED_ERRORS as exc:
        problems = [f"{type(exc).__name__}: {exc}"]
    if problems:
        runlog.verdict(runlog.REFUSED, "preflight: " + " | ".join(problems))
        yield failure("preflight failed: " + " | ".join(problems))
    else:
        runlog.verdict(runlog.UNTOUCHED, "preflight passed, the run stopped before any change")
        host.noop("preflight passed")


def _problems(s: NodeSettings) -> list[str]:
    snap = snapshot(s)
    problems = preflight_problems(s, snap)
    problems += turnlisteners.port_problems(listener_plan(s), snap.owners)
    storage = str(host.data.get("caddy_storage", caddyaccount.DEFAULT_STORAGE))
    problems += caddyaccount.problems(run(caddyaccount.check_command(storage))[1])
    try:
        check_canary(host.state, host, s)
    except CanaryRefusal as exc:
        problems.append(str(exc))
    try:
        _, router_yaml = new_router_config(s)
        parse_config(router_yaml, layout.ROUTER_CONFIG)
        turn = turn_tls_target(s, strict=True)
        # The real-address mode dials the alternate TLS port (deploy/source_routing.py).
        for addr in dict.fromkeys([turn, backend_addr(turn, s.turn_source)]):
            ok, out = run(answers_tls(addr))
            if out != "tls-ok":
                problems.append(f"the TURN server's TLS listener at {addr} does not complete a "
                                f"TLS handshake from the node: {out or 'no answer'}")
        _, caddyfile = new_caddyfile(s)
    except (ConfigError, RouterConfigMergeError) as exc:
        problems.append(f"router config: {exc}")
    else:
        staged = stage(caddyfile, "Caddyfile")
        # Caddy logs JSON at info level before the verdict; keep the lines that explain it.
        ok, out = run(f"{AS_CADDY} caddy validate --adapter caddyfile --config {staged} 2>&1"
                       " | grep -v '\"level\":\"info\"' | tail -n 3")
        if not (ok and "Valid configuration" in out):
            problems.append(f"new Caddyfile fails `caddy validate` on the node: {out}")
        else:
            ok, out = run(f"caddy adapt --adapter caddyfile --config {staged} 2>/dev/null")
            problems += privileged_listeners(out, s.caddyfile)
        staged = stage(router_yaml, "sni-router.yaml")
        if snapshot(s).installed:
            ok, out = run(f"{layout.ROUTER_BIN} check --config {staged} 2>&1")
            if not ok:
                problems.append(f"new sni-router.yaml fails `orama-sni-router check`: {out}")
    return problems


@operation()
@guarded
def backup() -> Commands:
    """Copy Caddyfile, drop-in, router config and unit to backups/<ts>/ once per cutover."""
    if executing():
        runlog.pause_here("backup")
        runlog.verdict(runlog.HALF_WAY, "after the backup: nothing else changed yet; run "
                       "deploys/rollback.py or the cutover again")
    s = settings()
    if snapshot(s).backup is None:
        yield sh(scripts.backup(s.caddyfile))
    else:
        host.noop("the pre-cutover backup exists (backups/pre-cutover)")

