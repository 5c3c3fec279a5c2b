"""Roll a node back to Caddy alone on :443/:80 and prove it."""

from __future__ import annotations

import time

from pyinfra.api.operation import operation

from orama_stealth.deploy import scripts
from orama_stealth.deploy.ops.common import Commands, executing, failure, settings, snapshot
from orama_stealth.deploy.ops.verify import report, state_json
from orama_stealth.deploy.verify import caddy_probes


@operation()
def rollback() -> Commands:
    """Return the node to Caddy alone on :443/:80, from whatever state it is in."""
    s = settings()
    snap = snapshot(s)
    if snap.before_state:
        return
    yield scripts.rollback(s.caddyfile, state_json("rolled-back", s, time.time(), snap.installed))


@operation()
def caddy_serves_443() -> Commands:
    """After a rollback: Caddy itself answers :443 (valid certificate) and :80."""
    if not executing():
        return
    failed = report(caddy_probes(settings()))
    if failed:
        yield failure("rollback verify failed: " + ", ".join(o.probe for o in failed))

