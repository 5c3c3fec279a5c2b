"""pyinfra operations of the cutover, rollback and verify deploys.

Each operation decides from fresh facts whether anything is left to do and yields nothing when
the node is already there, so a re-run reports no changes. Probes run only while executing
(pyinfra's change detection would otherwise probe a node that has not been changed yet).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Generator
from io import StringIO
from pathlib import Path
from typing import Any

from pyinfra.api.command import FunctionCommand, StringCommand
from pyinfra.api.operation import operation
from pyinfra.context import host
from pyinfra.operations import files

from orama_stealth.deploy import layout, render, scripts
from orama_stealth.deploy.canary import CanaryRefusal, check_canary
from orama_stealth.deploy.facts import NodeSnapshot, Snapshot, TextFile
from orama_stealth.deploy.routercfg import RouterConfigMergeError, operator_routes, routes_yaml
from orama_stealth.deploy.settings import NodeSettings, settings_from_data
from orama_stealth.deploy.source_routing import backend_addr
from orama_stealth.deploy.turn_target import TurnTlsListenersFact, answers_tls, choose, resolved
from orama_stealth.deploy.verify import Outcome, caddy_probes, cutover_probes
from orama_stealth.deploy.wheels import wheel_set
from orama_stealth.router.config import ConfigError, parse_config

logger = logging.getLogger("orama_stealth.deploy")
Commands = Generator[Any, None, None]
PAUSE_LIMIT = 600.0


def settings() -> NodeSettings:
    """The current host's settings (inventory data merged with --data)."""
    return settings_from_data(host.name, host.data)


def _snapshot(s: NodeSettings) -> Snapshot:
    snap: Snapshot = host.get_fact(NodeSnapshot, caddyfile=s.caddyfile)
    return snap


def _say(message: str, error: bool = False) -> None:
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


def _executing() -> bool:
    return bool(host.state.is_executing)


def _run(command: str) -> tuple[bool, str]:
    ok, output = host.run_shell_command(StringCommand(command))
    return ok, "\n".join([*output.stdout_lines, *output.stderr_lines]).strip()


def _stage(text: str, name: str) -> str:
    path = f"{layout.STAGING}/{name}"
    _run(f"mkdir -p {layout.STAGING}")
    host.put_file(StringIO(text), path)
    return path


def turn_tls_target(s: NodeSettings, strict: bool = False) -> str:
    """The non-loopback host:port of the TURN TLS listener the router's TURN routes use."""
    addr, problem = choose(s, host.get_fact(TurnTlsListenersFact, port=s.turn_tls_port), strict)
    if addr is None:
        raise RouterConfigMergeError(problem or "no TURN TLS address")
    return addr


def new_router_config(s: NodeSettings) -> tuple[str, str]:
    """(current text, merged text) of the node's sni-router.yaml."""
    current: str = host.get_fact(TextFile, path=layout.ROUTER_CONFIG)
    kept = operator_routes(current, layout.ROUTER_CONFIG, set(s.cdn_hosts))
    turn = backend_addr(turn_tls_target(s), s.turn_source)
    return current, render.router_config(resolved(s, turn), routes_yaml(kept))


def new_caddyfile(s: NodeSettings) -> tuple[str, str]:
    current: str = host.get_fact(TextFile, path=s.caddyfile)
    if not current.strip():
        raise RouterConfigMergeError(f"{s.caddyfile}: missing or empty on the node")
    return current, render.caddyfile(s, current)


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
    if not _executing():
        return
    s = settings()
    problems = preflight_problems(s, _snapshot(s))
    try:
        check_canary(host.state.inventory, host, s)
    except CanaryRefusal as exc:
        problems.append(str(exc))
    try:
        _, router_yaml = new_router_config(s)
        parse_config(router_yaml, layout.ROUTER_CONFIG)
        turn = turn_tls_target(s, strict=True)
        # The real-address mode dials the alternate TLS port (deploy/source_routing.py).
        for addr in dict.fromkeys([turn, backend_addr(turn, s.turn_source)]):
            ok, out = _run(answers_tls(addr))
            if out != "tls-ok":
                problems.append(f"the TURN server's TLS listener at {addr} does not complete a "
                                f"TLS handshake from the node: {out or 'no answer'}")
        _, caddyfile = new_caddyfile(s)
    except (ConfigError, RouterConfigMergeError) as exc:
        problems.append(f"router config: {exc}")
    else:
        staged = _stage(caddyfile, "Caddyfile")
        # Caddy logs JSON at info level before the verdict; keep the lines that explain it.
        ok, out = _run(f"{AS_CADDY} caddy validate --adapter caddyfile --config {staged} 2>&1"
                       " | grep -v '\"level\":\"info\"' | tail -n 3")
        if not (ok and "Valid configuration" in out):
            problems.append(f"new Caddyfile fails `caddy validate` on the node: {out}")
        else:
            ok, out = _run(f"caddy adapt --adapter caddyfile --config {staged} 2>/dev/null")
            problems += privileged_listeners(out, s.caddyfile)
        staged = _stage(router_yaml, "sni-router.yaml")
        if _snapshot(s).installed:
            ok, out = _run(f"{layout.ROUTER_BIN} check --config {staged} 2>&1")
            if not ok:
                problems.append(f"new sni-router.yaml fails `orama-sni-router check`: {out}")
    if problems:
        yield failure("preflight failed: " + " | ".join(problems))


@operation()
def backup() -> Commands:
    """Copy Caddyfile, drop-in, router config and unit to backups/<ts>/ once per cutover."""
    s = settings()
    if _snapshot(s).backup is None:
        yield scripts.backup(s.caddyfile)


@operation()
def install_router() -> Commands:
    """Upload the wheels and install the router into /opt/orama when the build changed."""
    s = settings()
    wheels = wheel_set(render.project_root(),
                       Path(s.router_wheel).expanduser() if s.router_wheel else None)
    if _snapshot(s).installed == wheels.fingerprint:
        return
    wheel_dir = f"{layout.WHEELS}/{wheels.fingerprint}"
    for wheel in wheels.all:
        yield from files.put._inner(src=str(wheel), dest=f"{wheel_dir}/{wheel.name}")
    yield scripts.install_router(wheel_dir, wheels.pip.name, wheels.fingerprint)


@operation()
def router_unit() -> Commands:
    """The hardened systemd unit of the router and the socket units holding :443/:80."""
    s = settings()
    unit = render.router_unit(s)
    changed = host.get_fact(TextFile, path=layout.ROUTER_UNIT) != unit
    yield from files.put._inner(src=StringIO(unit), dest=layout.ROUTER_UNIT, mode="644")
    for fd_name, path in zip(layout.SOCKETS, layout.SOCKET_UNITS, strict=True):
        yield from files.put._inner(src=StringIO(render.router_socket(fd_name)), dest=path,
                                    mode="644")
    if changed and _snapshot(s).router_active:
        # Capabilities (turn_source client adds CAP_NET_ADMIN) reach only a new process; the
        # socket units keep :443/:80 queueing meanwhile.
        yield (f"systemctl daemon-reload && systemctl restart {layout.ROUTER_UNIT_NAME}")


@operation()
def router_config() -> Commands:
    """sni-router.yaml: managed routes regenerated, operator routes kept; checked by the
    installed router before it replaces the file; a running router reloads it."""
    s = settings()
    current, new = new_router_config(s)
    if current == new:
        return
    staged = _stage(new, "sni-router.yaml")
    yield scripts.install_checked(
        staged, layout.ROUTER_CONFIG, f"{layout.ROUTER_BIN} check --config {staged} >/dev/null",
        then=f"if systemctl is-active -q {layout.ROUTER_UNIT_NAME}; then "
             f"systemctl reload {layout.ROUTER_UNIT_NAME}; fi",
    )


@operation()
def source_routing() -> Commands:
    """turn_source client: the policy routing that brings the TURN server's replies to clients'
    addresses back to the router; turn_source router: none (removed if left from before)."""
    from orama_stealth.deploy import source_routing as sr

    s = settings()
    if s.turn_source != "client":
        if host.get_fact(TextFile, path=sr.UNIT):
            yield sr.remove()
        return
    text = sr.unit(s, turn_tls_target(s))
    if host.get_fact(TextFile, path=sr.UNIT) == text:
        return
    yield sr.install(_stage(text, sr.UNIT_NAME))


@operation()
def caddy_config() -> Commands:
    """Managed blocks in the Caddyfile (validated first) and Caddy's unit drop-in."""
    s = settings()
    current, new = new_caddyfile(s)
    if current != new:
        staged = _stage(new, "Caddyfile")
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
    if not _snapshot(s).cut_over:
        yield scripts.SWITCH


def _report(outcomes: list[Outcome]) -> list[Outcome]:
    for o in outcomes:
        _say(f"probe {'ok' if o.ok else 'FAILED'}: {o.probe}: {o.detail}", error=not o.ok)
    return [o for o in outcomes if not o.ok]


def _state_json(state: str, s: NodeSettings, since: float, build: str | None) -> str:
    return json.dumps({"state": state, "since": since, "cdn_hosts": list(s.cdn_hosts),
                       "build": build}, sort_keys=True)


@operation()
def verify_or_rollback() -> Commands:
    """Probe through :443 and :80; on any failure roll the node back in this same run, prove
    Caddy serves :443 again, and fail naming the probe."""
    if not _executing():
        return
    s = settings()
    failed = _report(cutover_probes(s))
    snap = _snapshot(s)
    if not snap.router_active:
        failed.append(Outcome(f"unit {layout.ROUTER_UNIT_NAME}", False, "not active"))
    if not failed:
        return
    names = ", ".join(o.probe for o in failed)
    _say(f"verify failed ({names}): rolling back", error=True)
    ok, out = _run(scripts.rollback(s.caddyfile, _state_json("rolled-back", s, time.time(),
                                                              snap.installed)))
    after = _report(caddy_probes(s))
    status = "Caddy serves :443 again" if ok and not after else f"ROLLBACK INCOMPLETE: {out}"
    yield failure(f"cutover verify failed: {names}; rolled back: {status}")


@operation()
def record_state() -> Commands:
    """state.json: cut over since when (the canary soak counts from here), with which build."""
    s = settings()
    snap = _snapshot(s)
    st = snap.state
    if st.get("state") == "cutover" and st.get("cdn_hosts") == list(s.cdn_hosts) \
            and st.get("build") == snap.installed:
        return
    since = st["since"] if st.get("state") == "cutover" else time.time()
    text = _state_json("cutover", s, since, snap.installed)
    yield f"mkdir -p {layout.STATE_DIR} && printf '%s\\n' '{text}' > {layout.STATE_FILE}"


@operation()
def gateway() -> Commands:
    """Tell the gateway the stealth domain and check its credentials list turns:<cdn>:443 last."""
    s = settings()
    if s.gateway_config is None or s.gateway_url is None:
        if _executing():
            _say("gateway: not configured for this host (gateway_config/gateway_url), skipped")
        return
    from orama_stealth.deploy.gateway import check_credentials, set_stealth_domain

    yield from set_stealth_domain(s)
    if _executing():
        problem = check_credentials(s)
        if problem:
            yield failure(f"gateway: {problem}")


@operation()
def pause_point(step: str) -> Commands:
    """With --data pause_after=<step>, stop here so an interrupted cutover can be tested: the
    run waits (bounded) until killed, or until the file `pause_resume_file` (on this machine)
    appears, so a test can also change the node mid-run and let the cutover continue."""
    s = settings()
    if not _executing() or s.pause_after != step:
        return
    resume = host.data.get("pause_resume_file")
    print(f"orama-stealth: paused after step={step}", flush=True)
    deadline = time.monotonic() + PAUSE_LIMIT
    while time.monotonic() < deadline:
        if resume and os.path.exists(str(resume)):
            print(f"orama-stealth: resumed after step={step}", flush=True)
            return
        time.sleep(0.2)
    yield failure(f"paused after {step} for {PAUSE_LIMIT:.0f}s and nobody resumed or stopped it")


@operation()
def rollback() -> Commands:
    """Return the node to Caddy alone on :443/:80, from whatever state it is in."""
    s = settings()
    snap = _snapshot(s)
    if snap.before_state:
        return
    yield scripts.rollback(s.caddyfile, _state_json("rolled-back", s, time.time(), snap.installed))


@operation()
def caddy_serves_443() -> Commands:
    """After a rollback: Caddy itself answers :443 (valid certificate) and :80."""
    if not _executing():
        return
    failed = _report(caddy_probes(settings()))
    if failed:
        yield failure("rollback verify failed: " + ", ".join(o.probe for o in failed))


@operation()
def probes_only() -> Commands:
    """Read-only: the cutover probes, for watching a canary."""
    if not _executing():
        return
    s = settings()
    failed = _report(cutover_probes(s))
    if not _snapshot(s).router_active:
        failed.append(Outcome(f"unit {layout.ROUTER_UNIT_NAME}", False, "not active"))
        _say(f"probe FAILED: unit {layout.ROUTER_UNIT_NAME}: not active", error=True)
    if failed:
        yield failure("verify failed: " + ", ".join(o.probe for o in failed))
