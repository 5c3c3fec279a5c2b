"""Verify through :443 with real probes (rolling back on failure), and record the state."""

from __future__ import annotations

import json
import time

from pyinfra.api.operation import operation

from orama_stealth.deploy import layout, scripts
from orama_stealth.deploy.ops.common import (
    Commands,
    executing,
    failure,
    run,
    say,
    settings,
    snapshot,
)
from orama_stealth.deploy.settings import NodeSettings
from orama_stealth.deploy.verify import Outcome, caddy_probes, cutover_probes


def report(outcomes: list[Outcome]) -> list[Outcome]:
    for o in outcomes:
        say(f"probe {'ok' if o.ok else 'FAILED'}: {o.probe}: {o.detail}", error=not o.ok)
    return [o for o in outcomes if not o.ok]


def state_json(state: str, s: NodeSettings, since: float, build: str | None) -> str:
    return json.dumps({"state": state, "since": since, "cdn_hosts": list(s.cdn_hosts),
                       "build": build}, sort_keys=True)


@operation()
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
        return
    names = ", ".join(o.probe for o in failed)
    say(f"verify failed ({names}): rolling back", error=True)
    ok, out = run(scripts.rollback(s.caddyfile, state_json("rolled-back", s, time.time(),
                                                              snap.installed)))
    after = report(caddy_probes(s))
    status = "Caddy serves :443 again" if ok and not after else f"ROLLBACK INCOMPLETE: {out}"
    yield failure(f"cutover verify failed: {names}; rolled back: {status}")


@operation()
def record_state() -> Commands:
    """state.json: cut over since when (the canary soak counts from here), with which build."""
    s = settings()
    snap = snapshot(s)
    st = snap.state
    if st.get("state") == "cutover" and st.get("cdn_hosts") == list(s.cdn_hosts) \
            and st.get("build") == snap.installed:
        return
    since = st["since"] if st.get("state") == "cutover" else time.time()
    text = state_json("cutover", s, since, snap.installed)
    yield f"mkdir -p {layout.STATE_DIR} && printf '%s\\n' '{text}' > {layout.STATE_FILE}"



@operation()
def probes_only() -> Commands:
    """Read-only: the cutover probes, for watching a canary."""
    if not executing():
        return
    s = settings()
    failed = report(cutover_probes(s))
    if not snapshot(s).router_active:
        failed.append(Outcome(f"unit {layout.ROUTER_UNIT_NAME}", False, "not active"))
        say(f"probe FAILED: unit {layout.ROUTER_UNIT_NAME}: not active", error=True)
    if failed:
        yield failure("verify failed: " + ", ".join(o.probe for o in failed))
