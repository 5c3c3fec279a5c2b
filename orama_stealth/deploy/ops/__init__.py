"""pyinfra operations of the cutover, rollback and verify deploys, one module per subject.

Each operation decides from fresh facts whether anything is left to do and yields nothing when
the node is already there, so a re-run reports no changes. Probes run only while executing
(pyinfra's change detection would otherwise probe a node that has not been changed yet).
"""

from orama_stealth.deploy.ops.caddy import caddy_config, switch
from orama_stealth.deploy.ops.gateway import gateway
from orama_stealth.deploy.ops.install import install_router, router_config, router_unit
from orama_stealth.deploy.ops.pause import pause_point
from orama_stealth.deploy.ops.preflight import backup, preflight, privileged_listeners
from orama_stealth.deploy.ops.rollback import caddy_serves_443, rollback
from orama_stealth.deploy.ops.verify import probes_only, record_state, verify_or_rollback

__all__ = [
    "backup", "caddy_config", "caddy_serves_443", "gateway", "install_router", "pause_point",
    "preflight", "privileged_listeners", "probes_only", "record_state", "rollback",
    "router_config", "router_unit", "switch", "verify_or_rollback",
]
