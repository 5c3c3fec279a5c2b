"""Install the router: wheels uploaded and installed into /opt/orama, its units, its config."""

from __future__ import annotations

from pathlib import Path

from pyinfra.api.operation import operation
from pyinfra.context import host

from orama_stealth.deploy import handover, layout, render, runlog, scripts
from orama_stealth.deploy.ops.common import (
    Commands,
    executing,
    guarded,
    new_router_config,
    put,
    read_text,
    say,
    settings,
    sh,
    snapshot,
    stage,
    turn_tls_target,
)
from orama_stealth.deploy.wheels import wheel_set

# pip installing the router on a small, busy node takes tens of seconds.
INSTALL_TIMEOUT = 300
# A restart waits for the old router's drain (drain_timeout, 30 s by default) and its start.
RESTART_TIMEOUT = 300


@operation()
@guarded
def install_router() -> Commands:
    """Upload the wheels and install the router into /opt/orama when the build changed."""
    s = settings()
    snap = snapshot(s)
    if executing():
        # An upgrade that fails here never replaced the running router (install_router's
        # script puts the previous build back).
        runlog.verdict(runlog.HALF_WAY, "installing the router: " + (
            "the running router serves :443 on; run the cutover again from a good checkout"
            if snap.cut_over else
            "Caddy still serves :443; run deploys/rollback.py or the cutover again"))
    wheels = wheel_set(render.project_root(),
                       Path(s.router_wheel).expanduser() if s.router_wheel else None)
    if snap.installed == wheels.fingerprint:
        host.noop(f"router build {wheels.fingerprint} is installed")
        return
    wheel_dir = f"{layout.WHEELS}/{wheels.fingerprint}"
    for wheel in wheels.all:
        yield from put(f"{wheel_dir}/{wheel.name}", path=str(wheel))
    yield sh(scripts.install_router(wheel_dir, wheels.pip.name, wheels.fingerprint),
             timeout=INSTALL_TIMEOUT)


def needs_new_process(old_unit: str, new_unit: str) -> list[str]:
    """The unit settings a running router cannot take by reload: what systemd gives a process
    only when it starts (capabilities, the descriptor limit, the user, the sockets)."""
    keys = ("AmbientCapabilities=", "CapabilityBoundingSet=", "LimitNOFILE=", "DynamicUser=",
            "Sockets=", "User=", "Group=")

    def lines(text: str) -> dict[str, str]:
        return {k: ln for ln in text.splitlines() for k in keys if ln.startswith(k)}

    old, new = lines(old_unit), lines(new_unit)
    return [k.rstrip("=") for k in keys if old.get(k) != new.get(k)]


@operation()
@guarded
def router_unit() -> Commands:
    """The hardened systemd unit of the router and the socket units holding :443/:80. A
    running router takes a changed unit by reload; only settings systemd applies at start
    (capabilities, limits) need a new process, which costs a restart (docs/cutover.md)."""
    s = settings()
    unit = render.router_unit(s)
    current = read_text(layout.ROUTER_UNIT)
    yield from put(layout.ROUTER_UNIT, text=unit)
    for fd_name, path in zip(layout.SOCKETS, layout.SOCKET_UNITS, strict=True):
        yield from put(path, text=render.router_socket(fd_name))
    snap = snapshot(s)
    if not snap.router_active:
        return
    if not snap.router_in_place:
        # Started by a release before in-place upgrades: it cannot re-execute itself, and the
        # new unit's reload command would wait for an outcome it never writes.
        say("the running router predates in-place upgrades: restarting it once (new "
            "connections go to Caddy's ports while it drains)")
        stage(handover.redirect_rules(s.caddy_https_port, s.caddy_http_port),
              handover.REDIRECT_RULES.rsplit("/", 1)[1])
        yield sh(scripts.restart_once(s.caddy_https_port, s.caddy_http_port),
                 timeout=RESTART_TIMEOUT)
        return
    if current == unit:
        return
    restart = needs_new_process(current, unit) if current else []
    if restart:
        say(f"the router unit changed {', '.join(restart)}: only a new process takes that, so "
            "the router restarts (new connections wait in the socket backlog while it drains)")
        yield sh(f"systemctl daemon-reload && systemctl restart {layout.ROUTER_UNIT_NAME}")
    else:
        yield sh(f"systemctl daemon-reload && systemctl reload {layout.ROUTER_UNIT_NAME}")


@operation()
@guarded
def source_routing() -> Commands:
    """turn_source client: the policy routing that brings the TURN server's replies to clients'
    addresses back to the router; turn_source router: none (removed if left from before)."""
    from orama_stealth.deploy import source_routing as sr

    s = settings()
    if s.turn_source != "client":
        if read_text(sr.UNIT):
            yield sh(sr.remove())
        else:
            host.noop("no policy routing (turn_source router)")
        return
    text = sr.unit(s, turn_tls_target(s))
    if read_text(sr.UNIT) == text:
        host.noop("the policy routing unit is current")
        return
    yield sh(sr.install(stage(text, sr.UNIT_NAME)))


@operation()
@guarded
def router_config() -> Commands:
    """sni-router.yaml: managed routes regenerated, operator routes kept; checked by the
    installed router before it replaces the file; a running router reloads it."""
    if executing():
        runlog.pause_here("install")
    s = settings()
    current, new = new_router_config(s)
    if current == new:
        host.noop(f"{layout.ROUTER_CONFIG} is current")
        return
    staged = stage(new, "sni-router.yaml")
    yield sh(scripts.install_checked(
        staged, layout.ROUTER_CONFIG, f"{layout.ROUTER_BIN} check --config {staged} >/dev/null",
        then=f"if systemctl is-active -q {layout.ROUTER_UNIT_NAME}; then "
             f"systemctl reload {layout.ROUTER_UNIT_NAME}; fi",
    ))

