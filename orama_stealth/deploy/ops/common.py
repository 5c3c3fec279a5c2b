"""What every operation of the deploys shares: the host's settings and snapshot, remote
commands, messages that always show, and a command that fails the operation."""

from __future__ import annotations

import logging
from collections.abc import Generator
from io import StringIO
from typing import Any

from pyinfra.api.command import FunctionCommand, StringCommand
from pyinfra.context import host

from orama_stealth.deploy import layout, render
from orama_stealth.deploy.facts import NodeSnapshot, Snapshot, TextFile
from orama_stealth.deploy.routercfg import RouterConfigMergeError, operator_routes, routes_yaml
from orama_stealth.deploy.settings import NodeSettings, settings_from_data

logger = logging.getLogger("orama_stealth.deploy")
Commands = Generator[Any, None, None]


def settings() -> NodeSettings:
    """The current host's settings (inventory data merged with --data)."""
    return settings_from_data(host.name, host.data)


def snapshot(s: NodeSettings) -> Snapshot:
    snap: Snapshot = host.get_fact(NodeSnapshot, caddyfile=s.caddyfile)
    return snap


def say(message: str, error: bool = False) -> None:
    # pyinfra shows info-level host logs only with -v; probe outcomes must always show.
    host.log_styled(message, fg="red" if error else "cyan",
                    log_func=logger.error if error else logger.warning)


def _fail(state: Any, host: Any, message: str) -> bool:
    # pyinfra passes (state, host) only to callbacks whose parameters carry these names.
    del state
    host.log_styled(message, fg="red", log_func=logger.error)
    return False


def failure(message: str) -> FunctionCommand:
    """A command that fails the operation with `message`, so the run stops and exits non-zero."""
    return FunctionCommand(_fail, (message,), {})


def executing() -> bool:
    return bool(host.state.is_executing)


def run(command: str) -> tuple[bool, str]:
    ok, output = host.run_shell_command(StringCommand(command))
    return ok, "\n".join([*output.stdout_lines, *output.stderr_lines]).strip()


def stage(text: str, name: str) -> str:
    path = f"{layout.STAGING}/{name}"
    run(f"mkdir -p {layout.STAGING}")
    host.put_file(StringIO(text), path)
    return path


def new_router_config(s: NodeSettings) -> tuple[str, str]:
    """(current text, merged text) of the node's sni-router.yaml."""
    current: str = host.get_fact(TextFile, path=layout.ROUTER_CONFIG)
    kept = operator_routes(current, layout.ROUTER_CONFIG, set(s.cdn_hosts))
    return current, render.router_config(s, routes_yaml(kept))


def new_caddyfile(s: NodeSettings) -> tuple[str, str]:
    current: str = host.get_fact(TextFile, path=s.caddyfile)
    if not current.strip():
        raise RouterConfigMergeError(f"{s.caddyfile}: missing or empty on the node")
    return current, render.caddyfile(s, current)

