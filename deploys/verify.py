"""Read-only: probe nodes through :443 and :80 the way clients do (for watching a canary),
then one line per node: router build, routes, certificate days left, cut over or not.

    pyinfra -y inventories/prod.py deploys/verify.py --limit canary
    pyinfra -y inventories/prod.py deploys/verify.py                 # every node's line
"""

from orama_stealth.deploy import certtruth, ops

ops.probes_only(name="verify through :443 and :80")
certtruth.certificate_truth(name="served certificates are Caddy's current ones, not expiring")
