"""Caddy behind the router: its new Caddyfile and drop-in, then the switch of :443/:80."""

from __future__ import annotations

from io import StringIO

from pyinfra.api.operation import operation
from pyinfra.operations import files

from orama_stealth.deploy import layout, render, scripts
from orama_stealth.deploy.ops.common import Commands, new_caddyfile, settings, snapshot, stage
from orama_stealth.deploy.ops.preflight import AS_CADDY


@operation()
def caddy_config() -> Commands:
    """Managed blocks in the Caddyfile (validated first) and Caddy's unit drop-in."""
    s = settings()
    current, new = new_caddyfile(s)
    if current != new:
        staged = stage(new, "Caddyfile")
        yield scripts.install_checked(
            staged, s.caddyfile,
            f"{AS_CADDY} caddy validate --adapter caddyfile --config {staged} >/dev/null",
            # Before the switch Caddy must keep :443; after it, a changed Caddyfile is reloaded.
            then=f"if systemctl is-active -q {layout.ROUTER_UNIT_NAME}; then "
                 "systemctl reload caddy.service; fi",
        )
    yield from files.put._inner(src=StringIO(render.caddy_dropin(s)), dest=layout.CADDY_DROPIN,
                                mode="644")


@operation()
def switch() -> Commands:
    """daemon-reload, stop Caddy, start the router, start Caddy: one remote command."""
    s = settings()
    if not snapshot(s).cut_over:
        yield scripts.SWITCH

