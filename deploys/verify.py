"""Read-only: probe a node through :443 and :80 the way clients do (for watching a canary).

    pyinfra -y inventories/prod.py deploys/verify.py --limit canary
"""

from orama_stealth.deploy import certtruth, ops

ops.probes_only(name="verify through :443 and :80")
certtruth.certificate_truth(name="served certificates are Caddy's current ones, not expiring")
