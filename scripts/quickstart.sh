#!/usr/bin/env bash
# The whole product on one machine: install, boot the lab node (a real Debian 12 host in the
# state of an Orama node before the cutover), cut it over with pyinfra, then probe it through
# :443 the way a client would. `orama-stealth lab down` removes the node afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/bootstrap.sh

echo "== lab node up"
orama-stealth lab up
status=$(orama-stealth lab status --json)
field() { python3 -c 'import json,sys; v=json.loads(sys.argv[1])[sys.argv[2]]; print(v[0] if isinstance(v, list) else v)' "$status" "$1"; }
addr=$(field address); base=$(field base_domain); cdn=$(field cdn_hosts)
ca=$(field ca_file); secret=$(field turn_secret_file)

echo "== cutover: pyinfra -y inventories/lab.py deploys/cutover.py"
pyinfra -y inventories/lab.py deploys/cutover.py

echo "== probes through $addr:443"
orama-stealth probe "$addr:443" --sni "$base" --ca "$ca" --https --expect-server Caddy
orama-stealth probe "$addr:443" --sni "$cdn" --ca "$ca" --turn --turn-secret-file "$secret"

cat <<TXT

The node at $addr now runs orama-sni-router on :443/:80 with Caddy behind it.
  orama-stealth lab ssh journalctl -u orama-sni-router      # the router's log
  pyinfra -y inventories/lab.py deploys/verify.py           # the probes again, read-only
  pyinfra -y inventories/lab.py deploys/rollback.py         # back to Caddy on :443
  orama-stealth lab down                                    # remove the node
TXT
