"""Caddy behind the router: its new Caddyfile and drop-in, then the switch of :443/:80."""

from __future__ import annotations

from pyinfra.api.operation import operation
from pyinfra.context import host

from orama_stealth.deploy import layout, render, runlog, scripts
from orama_stealth.deploy.ops.common import (
    Commands,
    executing,
    guarded,
    new_caddyfile,
    put,
    read_text,
    settings,
    sh,
    snapshot,
    stage,
)
from orama_stealth.deploy.ops.handover import stage_for_cutover
from orama_stealth.deploy.ops.preflight import AS_CADDY

# Two Caddy reloads, the router's start and the wait for redirected connections to finish.
SWITCH_TIMEOUT = 180


@operation()
@guarded
def caddy_config() -> Commands:
    """Managed blocks in the Caddyfile (validated first) and Caddy's unit drop-in."""
    s = settings()
    # Before any Caddy reload of the cutover: queued connections survive Caddy's reloads.
    yield from put(layout.SYSCTL_DROPIN, text=render.sysctl_dropin())
    if read_text(layout.MIGRATE_REQ).strip() == "0":
        # Not fatal: without it a Caddy reload may reset a connection queued at that moment.
        yield sh(f"echo 1 > {layout.MIGRATE_REQ} 2>/dev/null || echo 'orama-stealth: cannot "
                 "set net.ipv4.tcp_migrate_req=1 here (read-only /proc/sys?): a Caddy reload may "
                 "reset a connection queued on its old listener' >&2")
    current, new = new_caddyfile(s)
    if current != new:
        staged = stage(new, "Caddyfile")
        yield sh(scripts.install_checked(
            staged, s.caddyfile,
            f"{AS_CADDY} caddy validate --adapter caddyfile --config {staged} >/dev/null",
            # Before the switch Caddy must keep :443; after it, a changed Caddyfile is reloaded.
            then=f"if systemctl is-active -q {layout.ROUTER_UNIT_NAME}; then "
                 "systemctl reload caddy.service; fi",
        ))
    else:
        host.noop(f"{s.caddyfile} has the current managed blocks")
    dropin = list(put(layout.CADDY_DROPIN, text=render.caddy_dropin(s)))
    if dropin:
        yield from dropin
        # The drop-in holds ordering only, which a daemon-reload applies. Left pending, it
        # would make a cut-over node look half-switched, and the switch restart Caddy.
        yield sh("systemctl daemon-reload")


@operation()
@guarded
def switch() -> Commands:
    """Caddy on both port pairs, new connections redirected to its new ports, Caddy on its new
    ports only, the router started, the redirect removed: one remote command."""
    if executing():
        runlog.pause_here("switch")
        runlog.verdict(runlog.HALF_WAY, "switched to the router, not verified: run "
                       "deploys/rollback.py or the cutover again")
    s = settings()
    if not snapshot(s).cut_over:
        if executing():
            stage_for_cutover()
        yield sh(scripts.switch(s.caddy_https_port, s.caddy_http_port), timeout=SWITCH_TIMEOUT)
    else:
        host.noop("the router already owns :443/:80 with Caddy behind it")
