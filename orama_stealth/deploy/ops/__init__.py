"""pyinfra operations of the cutover, rollback and verify deploys, one module per subject.

Each operation decides from fresh facts whether anything is left to do, yields nothing and
says so (`host.noop`) when the node is already there, so `--dry` and a re-run show the truth.
Probes run only while executing (pyinfra's change detection would otherwise probe a node that
has not been changed yet). How each node ended is printed after pyinfra's output
(deploy/runlog.py).
"""

from orama_stealth.deploy.ops.caddy import caddy_config, switch
from orama_stealth.deploy.ops.gateway import gateway
from orama_stealth.deploy.ops.install import (
    install_router,
    router_config,
    router_unit,
    source_routing,
)
from orama_stealth.deploy.ops.preflight import backup, preflight, privileged_listeners
from orama_stealth.deploy.ops.rollback import caddy_serves_443, rollback
from orama_stealth.deploy.ops.verify import probes_only, record_state, verify_or_rollback

__all__ = [
    "backup", "caddy_config", "caddy_serves_443", "gateway", "install_router", "preflight",
    "privileged_listeners", "probes_only", "record_state", "rollback", "router_config",
    "router_unit", "source_routing", "switch", "verify_or_rollback",
]
