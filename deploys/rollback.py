"""Roll nodes back to Caddy alone on :443/:80, from any state (half-done cutover included).

    pyinfra -y inventories/prod.py deploys/rollback.py --limit <host>
    pyinfra -y inventories/prod.py deploys/rollback.py --limit fleet    # every node at once

Router stopped, disabled and its unit removed; Caddy's backed-up Caddyfile and capabilities
restored; Caddy restarted; then probes prove Caddy serves :443 again. Running it twice is harmless.
"""

from orama_stealth.deploy import ops, turncert

ops.rollback(name="1. stop the router, restore Caddy's files, restart Caddy")
turncert.turn_certificate_rollback(name="1b. TURN server back on its own certificate files")
ops.caddy_serves_443(name="2. verify Caddy serves :443 and :80")
