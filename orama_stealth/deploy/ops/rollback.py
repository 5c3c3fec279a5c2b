"""Roll a node back to Caddy alone on :443/:80 and prove it."""

from __future__ import annotations

import time

from pyinfra.api.operation import operation
from pyinfra.context import host

from orama_stealth.deploy import runlog, scripts
from orama_stealth.deploy.ops.common import (
    Commands,
    executing,
    failure,
    guarded,
    settings,
    sh,
    snapshot,
)
from orama_stealth.deploy.ops.handover import stage_for_rollback
from orama_stealth.deploy.ops.verify import ROLLBACK_TIMEOUT, report, state_json
from orama_stealth.deploy.verify import caddy_probes


@operation()
@guarded
def rollback() -> Commands:
    """Return the node to Caddy alone on :443/:80, from whatever state it is in."""
    s = settings()
    snap = snapshot(s)
    if snap.before_state:
        if executing():
            runlog.verdict(runlog.CADDY, "nothing to roll back")
        host.noop("Caddy alone serves :443/:80, nothing of a cutover is left")
        return
    if executing():
        runlog.verdict(runlog.CADDY, "rolled back")
        stage_for_rollback()
    yield sh(scripts.rollback(s.caddyfile, state_json("rolled-back", s, time.time(),
                                                      snap.installed),
                              s.caddy_https_port, s.caddy_http_port),
             timeout=ROLLBACK_TIMEOUT)


@operation()
@guarded
def caddy_serves_443() -> Commands:
    """After a rollback: Caddy itself answers :443 (valid certificate) and :80."""
    if not executing():
        return
    failed = report(caddy_probes(settings()))
    if failed:
        names = ", ".join(o.probe for o in failed)
        runlog.verdict(runlog.FAILED, f"Caddy does not serve after the rollback: {names}")
        yield failure("rollback verify failed: " + names)
    else:
        host.noop("Caddy serves :443 and :80")

