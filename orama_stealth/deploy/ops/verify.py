"""Verify through :443 with real probes (rolling back on failure), and record the state."""

from __future__ import annotations

import json
import re
import time

from pyinfra.api.operation import operation
from pyinfra.context import host

from orama_stealth.deploy import layout, runlog, scripts
from orama_stealth.deploy.facts import Snapshot
from orama_stealth.deploy.ops.common import (
    Commands,
    executing,
    failure,
    guarded,
    read_text,
    run,
    say,
    settings,
    sh,
    snapshot,
)
from orama_stealth.deploy.ops.handover import stage_for_rollback
from orama_stealth.deploy.settings import NodeSettings
from orama_stealth.deploy.verify import Outcome, caddy_probes, cutover_probes


def report(outcomes: list[Outcome]) -> list[Outcome]:
    for o in outcomes:
        say(f"probe {'ok' if o.ok else 'FAILED'}: {o.probe}: {o.detail}", error=not o.ok)
    return [o for o in outcomes if not o.ok]


def state_json(state: str, s: NodeSettings, since: float, build: str | None) -> str:
    return json.dumps({"state": state, "since": since, "cdn_hosts": list(s.cdn_hosts),
                       "build": build}, sort_keys=True)


ROLLBACK_TIMEOUT = 180
CERT_DAYS = re.compile(r"expires in (-?\d+)d")


@operation()
@guarded
def verify_or_rollback() -> Commands:
    """Probe through :443 and :80; on any failure roll the node back in this same run, prove
    Caddy serves :443 again, and fail naming the probe."""
    if not executing():
        return
    s = settings()
    failed = report(cutover_probes(s))
    snap = snapshot(s)
    if not snap.router_active:
        failed.append(Outcome(f"unit {layout.ROUTER_UNIT_NAME}", False, "not active"))
    if not failed:
        host.noop("every probe passed")
        return
    names = ", ".join(o.probe for o in failed)
    say(f"verify failed ({names}): rolling back", error=True)
    stage_for_rollback()
    ok, out = run(scripts.rollback(s.caddyfile, state_json("rolled-back", s, time.time(),
                                                           snap.installed),
                                   s.caddy_https_port, s.caddy_http_port),
                  timeout=ROLLBACK_TIMEOUT)
    if ok:
        # The TURN listeners of step 4c go too (instances, units, copies, own certificate).
        from orama_stealth.deploy import turncert

        ok, out = turncert.rollback_now()
    after = report(caddy_probes(s))
    status = "Caddy serves :443 again" if ok and not after else f"ROLLBACK INCOMPLETE: {out}"
    if ok and not after:
        runlog.verdict(runlog.ROLLED_BACK, f"failed probe: {names}; {status}")
    else:
        runlog.verdict(runlog.FAILED, f"failed probe: {names}; {status}")
    yield failure(f"cutover verify failed: {names}; rolled back: {status}")


@operation()
@guarded
def record_state() -> Commands:
    """state.json: cut over since when (the canary soak counts from here), with which build."""
    if executing():
        runlog.pause_here("verify")
    s = settings()
    snap = snapshot(s)
    st = snap.state
    if executing():
        runlog.verdict(runlog.CUT_OVER, f"router build {snap.installed}")
    if st.get("state") == "cutover" and st.get("cdn_hosts") == list(s.cdn_hosts) \
            and st.get("build") == snap.installed:
        host.noop(f"{layout.STATE_FILE} records this cutover")
        return
    since = st["since"] if st.get("state") == "cutover" else time.time()
    text = state_json("cutover", s, since, snap.installed)
    yield sh(f"mkdir -p {layout.STATE_DIR} && printf '%s\\n' '{text}' > {layout.STATE_FILE}")



def node_status(s: NodeSettings, snap: Snapshot, outcomes: list[Outcome]) -> str:
    """What a node runs, for the per-node table: build, routes, certificate days left."""
    routes = sum(1 for line in read_text(layout.ROUTER_CONFIG).splitlines()
                 if line.lstrip().startswith("- match:"))
    days = sorted({m.group(1) for o in outcomes if (m := CERT_DAYS.search(o.detail))})
    since = snap.state.get("since")
    return ", ".join([
        f"router build {snap.installed or 'none'}",
        f"{routes} route(s) in {layout.ROUTER_CONFIG}",
        f"certificate days left {'/'.join(days) or 'unknown'}",
        f"cut over since {time.strftime('%Y-%m-%d %H:%M', time.gmtime(since))} UTC"
        if snap.cut_over and isinstance(since, int | float) else
        ("cut over" if snap.cut_over else "not cut over"),
    ])


@operation()
@guarded
def probes_only() -> Commands:
    """Read-only: the cutover probes, for watching a canary; the per-node line says what the
    node runs (router build, routes, certificate days left, cut over or not)."""
    if not executing():
        return
    s = settings()
    outcomes = cutover_probes(s)
    failed = report(outcomes)
    snap = snapshot(s)
    if not snap.router_active:
        failed.append(Outcome(f"unit {layout.ROUTER_UNIT_NAME}", False, "not active"))
        say(f"probe FAILED: unit {layout.ROUTER_UNIT_NAME}: not active", error=True)
    status = node_status(s, snap, outcomes)
    if failed:
        names = ", ".join(o.probe for o in failed)
        runlog.verdict(runlog.NOT_SERVING, f"{status}; failed probe: {names}")
        yield failure("verify failed: " + names)
    else:
        runlog.verdict("serving through the router", status)
        host.noop("every probe passed")
