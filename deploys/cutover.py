"""Cut nodes over: the SNI router takes :443/:80, Caddy moves behind it to :8443/:8080.

    pyinfra -y inventories/prod.py deploys/cutover.py --limit canary
    pyinfra -y inventories/prod.py deploys/cutover.py --limit fleet   # after the canary soaked

Every node runs these steps at once; a node that fails a step stops there alone (a failed
verify rolls it back in the same run) and the others go on. Every step is idempotent: a re-run
changes nothing. After pyinfra's output one line per node says how it ended; the run exits
non-zero if any node did not end cut over. Waves: add `--fail-percent N` to stop the run when
more than N% of its nodes failed. See docs/cutover.md.
"""

from orama_stealth.deploy import certtruth, ops, turncert

# 1. Preflight: fail before any change (Caddy on :443, TURN TLS up, ports 8443/8080 free,
#    canary soaked, new Caddyfile and router config accepted by caddy and orama-sni-router).
ops.preflight(name="1. preflight")

# 2. Back up everything the cutover changes, once, to /var/lib/orama-stealth/backups/<ts>/.
ops.backup(name="2. backup Caddyfile, drop-in, router config and unit")

# 3. Install the router from uploaded wheels into /opt/orama, its unit and its config.
ops.install_router(name="3a. install orama-sni-router into /opt/orama from uploaded wheels")
ops.router_unit(name="3b. router systemd unit")
# The policy routing comes before a config that dials from client addresses needs it.
ops.source_routing(name="3c. policy routing for turn_source client (none otherwise)")
ops.router_config(name="3d. sni-router.yaml (operator routes kept)")

# 4. Caddy's new config and drop-in, then the switch: stop Caddy, start router, start Caddy.
ops.caddy_config(name="4a. Caddyfile managed blocks and caddy.service drop-in")
ops.switch(name="4b. switch :443/:80 from Caddy to the router")
# tls_mode acme: each stealth name's TURN TLS listener serves Caddy's certificate for it (the
# main TURN server for the first name, an orama-turn-tls@ instance for each other; a new name
# starts its own); renewals reach them by SIGUSR2. Before verify, which probes every name.
turncert.turn_certificate(name="4c. TURN listeners take Caddy's certificate for each stealth name")

# 5. Verify with real probes through :443 and :80; on failure roll back and fail this node.
ops.verify_or_rollback(name="5. verify through :443 (rolls back on failure)")
ops.record_state(name="5b. record cutover state")
certtruth.certificate_truth(name="5c. served certificates are Caddy's current ones, not expiring")

# 6. Optional: the gateway's stealth domain and its credentials ladder.
ops.gateway(name="6. gateway stealth domain")
