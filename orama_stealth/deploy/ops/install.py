"""Install the router: wheels uploaded and installed into /opt/orama, its units, its config."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

from pyinfra.api.operation import operation
from pyinfra.operations import files

from orama_stealth.deploy import layout, render, scripts
from orama_stealth.deploy.ops.common import (
    Commands,
    new_router_config,
    settings,
    snapshot,
    stage,
)
from orama_stealth.deploy.wheels import wheel_set


@operation()
def install_router() -> Commands:
    """Upload the wheels and install the router into /opt/orama when the build changed."""
    s = settings()
    wheels = wheel_set(render.project_root(),
                       Path(s.router_wheel).expanduser() if s.router_wheel else None)
    if snapshot(s).installed == wheels.fingerprint:
        return
    wheel_dir = f"{layout.WHEELS}/{wheels.fingerprint}"
    for wheel in wheels.all:
        yield from files.put._inner(src=str(wheel), dest=f"{wheel_dir}/{wheel.name}")
    yield scripts.install_router(wheel_dir, wheels.pip.name, wheels.fingerprint)


@operation()
def router_unit() -> Commands:
    """The hardened systemd unit of the router and the socket units holding :443/:80."""
    s = settings()
    yield from files.put._inner(src=StringIO(render.router_unit(s)), dest=layout.ROUTER_UNIT,
                                mode="644")
    for fd_name, path in zip(layout.SOCKETS, layout.SOCKET_UNITS, strict=True):
        yield from files.put._inner(src=StringIO(render.router_socket(fd_name)), dest=path,
                                    mode="644")


@operation()
def router_config() -> Commands:
    """sni-router.yaml: managed routes regenerated, operator routes kept; checked by the
    installed router before it replaces the file; a running router reloads it."""
    s = settings()
    current, new = new_router_config(s)
    if current == new:
        return
    staged = stage(new, "sni-router.yaml")
    yield scripts.install_checked(
        staged, layout.ROUTER_CONFIG, f"{layout.ROUTER_BIN} check --config {staged} >/dev/null",
        then=f"if systemctl is-active -q {layout.ROUTER_UNIT_NAME}; then "
             f"systemctl reload {layout.ROUTER_UNIT_NAME}; fi",
    )

