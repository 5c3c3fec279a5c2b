"""What every operation of the deploys shares: the host's settings and snapshot, remote
commands and uploads that always have a time-out, messages that always show, a command that
fails the operation, and `guarded`, which turns an expected error into that failure.

pyinfra runs every host at once (greenlets in one process): nothing here is shared between
hosts, and every remote step is bounded, so a run can fail but never hang.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
from collections.abc import Callable, Generator
from functools import wraps
from io import StringIO
from pathlib import Path, PurePosixPath
from typing import IO, Any, ParamSpec

import gevent
from pyinfra.api.command import FunctionCommand, StringCommand
from pyinfra.context import host
from pyinfra.facts.files import Sha1File

from orama_stealth.deploy import layout, render, runlog, turnlisteners
from orama_stealth.deploy.facts import NodeSnapshot, Snapshot, TextFile
from orama_stealth.deploy.routercfg import RouterConfigMergeError, operator_routes, routes_yaml
from orama_stealth.deploy.settings import NodeSettings, SettingsError, settings_from_data
from orama_stealth.deploy.source_routing import backend_addr
from orama_stealth.deploy.turn_target import TurnTlsListenersFact, choose, resolved
from orama_stealth.deploy.wheels import WheelError

logger = logging.getLogger("orama_stealth.deploy")
Commands = Generator[Any, None, None]
P = ParamSpec("P")

# Every remote step is bounded. A command that legitimately runs long (pip install on a slow
# node, the switch waiting for Caddy) gets its own bound where it is yielded.
FACT_TIMEOUT = 60
COMMAND_TIMEOUT = 120
UPLOAD_TIMEOUT = 300


class NodeReadError(RuntimeError):
    """The node's state could not be read (time-out, broken connection)."""


# Errors an operation reports as this node's failure instead of pyinfra's internal exception.
EXPECTED_ERRORS = (NodeReadError, RouterConfigMergeError, SettingsError, WheelError, OSError,
                   TimeoutError)


def settings() -> NodeSettings:
    """The current host's settings (inventory data merged with --data)."""
    runlog.attach(host.state)
    return settings_from_data(host.name, host.data)


def snapshot(s: NodeSettings) -> Snapshot:
    """The node's snapshot, read now; raises NodeReadError if the read did not complete."""
    snap: Snapshot = host.get_fact(NodeSnapshot, caddyfile=s.caddyfile, _timeout=FACT_TIMEOUT)
    if not snap.complete:
        raise NodeReadError(f"could not read the node's state within {FACT_TIMEOUT}s "
                            "(see the error above)")
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


def guarded(op: Callable[P, Commands]) -> Callable[P, Commands]:
    """An expected error inside the operation fails this node with its message; pyinfra would
    otherwise report an internal exception and stop the whole run."""

    @wraps(op)
    def run_op(*args: P.args, **kwargs: P.kwargs) -> Commands:
        try:
            yield from op(*args, **kwargs)
        except EXPECTED_ERRORS as exc:
            yield failure(f"{type(exc).__name__}: {exc}")

    return run_op


def executing() -> bool:
    return bool(host.state.is_executing)


def sh(script: str, timeout: int = COMMAND_TIMEOUT) -> StringCommand:
    """A remote shell command with a bound on its run time."""
    return StringCommand(script.strip(), _timeout=timeout)


def run(command: str, timeout: int = COMMAND_TIMEOUT) -> tuple[bool, str]:
    """Run a command on the current host now; a time-out is a failed command, not an error."""
    try:
        ok, output = host.run_shell_command(StringCommand(command), _timeout=timeout)
    except TimeoutError:
        return False, f"timed out after {timeout}s"
    return ok, "\n".join([*output.stdout_lines, *output.stderr_lines]).strip()


def _put(src: str | IO[Any], dest: str, timeout: int) -> bool:
    try:
        with gevent.Timeout(timeout, TimeoutError):
            ok: bool = host.put_file(src, dest)
    except TimeoutError:
        host.log_styled(f"upload to {dest} timed out after {timeout}s", fg="red",
                        log_func=logger.error)
        return False
    return ok


def stage(text: str, name: str) -> str:
    """Upload `text` to the staging directory now (for checks before anything changes)."""
    path = f"{layout.STAGING}/{name}"
    ok, out = run(f"mkdir -p {layout.STAGING}")
    if not (ok and _put(StringIO(text), path, UPLOAD_TIMEOUT)):
        raise NodeReadError(f"could not stage {path} on the node: {out or 'upload failed'}")
    return path


def put(dest: str, *, text: str | None = None, path: str | None = None, mode: str = "644",
        timeout: int = UPLOAD_TIMEOUT) -> Commands:
    """Make `dest` on the node hold `text` (or the local file `path`) with `mode`: uploads only
    when the content differs, so an unchanged file yields nothing."""
    if (text is None) == (path is None):
        raise ValueError("put() takes text or path")
    data = text.encode() if text is not None else Path(str(path)).read_bytes()
    current = host.get_fact(Sha1File, path=dest, _timeout=FACT_TIMEOUT)
    if current == hashlib.sha1(data).hexdigest():
        return
    q = shlex.quote(dest)
    yield sh(f"mkdir -p {shlex.quote(str(PurePosixPath(dest).parent))}")
    src: str | IO[Any] = StringIO(text) if text is not None else str(path)
    yield FunctionCommand(_put_command, (src, dest, timeout), {})
    yield sh(f"chmod {mode} {q}")


def _put_command(state: Any, host: Any, src: str | IO[Any], dest: str, timeout: int) -> bool:
    del state, host  # the current host is in context
    if not isinstance(src, str):
        src.seek(0)  # the same command object may run again on a retry
    return _put(src, dest, timeout)


def read_text(path: str) -> str:
    """A node file's text ("" when absent); NodeReadError when it could not be read."""
    text: str | None = host.get_fact(TextFile, path=path, _timeout=FACT_TIMEOUT)
    if text is None:
        raise NodeReadError(f"could not read {path} on the node within {FACT_TIMEOUT}s")
    return text


def turn_tls_target(s: NodeSettings, strict: bool = False) -> str:
    """The non-loopback host:port of the TURN TLS listener the router's TURN routes use."""
    listeners = host.get_fact(TurnTlsListenersFact, port=s.turn_tls_port, _timeout=FACT_TIMEOUT)
    addr, problem = choose(s, listeners, strict)
    if addr is None:
        raise RouterConfigMergeError(problem or "no TURN TLS address")
    return addr


def held_ports() -> dict[str, int]:
    """The TLS port each TURN listener instance on the node holds (turnlisteners.plan keeps
    every name there); NodeReadError when the read did not complete, since a partial read would
    move listeners."""
    held: turnlisteners.HeldPorts = host.get_fact(turnlisteners.ListenerPortsFact,
                                                  _timeout=FACT_TIMEOUT)
    if not held.complete:
        raise NodeReadError(f"could not read the TURN listeners' ports under "
                            f"{turnlisteners.TLS_DIR} within {FACT_TIMEOUT}s")
    return held.ports


def listener_plan(s: NodeSettings) -> turnlisteners.ListenerPlan:
    """Which TURN listener serves which cdn name, every existing name on its port."""
    return turnlisteners.plan(s, host.data, held_ports())


def new_router_config(s: NodeSettings) -> tuple[str, str]:
    """(current text, merged text) of the node's sni-router.yaml."""
    current = read_text(layout.ROUTER_CONFIG)
    kept = operator_routes(current, layout.ROUTER_CONFIG, set(s.cdn_hosts))
    turn = backend_addr(turn_tls_target(s), s.turn_source)
    ports = {li.name: li.port for li in listener_plan(s).instances}
    return current, render.router_config(resolved(s, turn), routes_yaml(kept), ports)


def new_caddyfile(s: NodeSettings) -> tuple[str, str]:
    current = read_text(s.caddyfile)
    if not current.strip():
        raise RouterConfigMergeError(f"{s.caddyfile}: missing or empty on the node")
    return current, render.caddyfile(s, current)
