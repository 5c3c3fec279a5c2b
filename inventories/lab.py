"""The local lab nodes (`orama-stealth lab up [--count N]`): needs no editing, it asks the lab.

    orama-stealth lab up --count 4
    pyinfra -y inventories/lab.py deploys/cutover.py --limit canary
    pyinfra -y inventories/lab.py deploys/cutover.py --limit fleet --data canary_soak=0

The first node is the canary group, the others the fleet group. Environment (for tests):
  ORAMA_LAB_NAME=NAME     the lab nodes to use (default: the lab's default name)
  ORAMA_LAB_STATUS=FILE   read this `lab status --json --all` document (a list of nodes, or one
                          node) instead of asking the lab
  ORAMA_LAB_CANARY=0      no canary group: every node is in the fleet group (the canary rule
                          does not apply), to time one run over every node
  ORAMA_LAB_ROLE=fleet    with one node, also list it as the fleet host `<name>-fleet`, so the
                          canary rule can be exercised with one node (run with --limit fleet)
"""

import json
import os
import subprocess
import sys
import tempfile


def _status() -> list:
    path = os.environ.get("ORAMA_LAB_STATUS")
    if path:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        return doc if isinstance(doc, list) else [doc]
    name = os.environ.get("ORAMA_LAB_NAME")
    proc = subprocess.run(
        [sys.executable, "-m", "orama_stealth.stealth_cli", "lab", "status", "--json", "--all",
         *(["--name", name] if name else [])],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"inventories/lab.py: `orama-stealth lab status --json --all` failed "
                         f"(are the lab nodes up? `orama-stealth lab up`): {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def _host(lab: dict) -> tuple:
    if not lab.get("running", True):
        raise SystemExit(f"inventories/lab.py: lab node {lab['name']} is not running: "
                         "`orama-stealth lab up`")
    files = lab.get("node_files") or {}
    data = {
        "ssh_hostname": lab["address"],
        "ssh_user": lab.get("ssh_user", "root"),
        "ssh_key": lab["ssh_key"],
        "ssh_known_hosts_file": lab.get("known_hosts")
        or os.path.join(tempfile.gettempdir(), f"orama-lab-known-hosts-{lab['name']}"),
        # Each lab boot may bring new host keys; the lab records them, new ones are accepted.
        "ssh_strict_host_key_checking": "accept-new",
        "probe_address": lab["address"],
        "base_domain": lab["base_domain"],
        "cdn_hosts": list(lab.get("cdn_hosts") or []),
        # auto: the deploy finds the non-loopback address where coturn's TLS listener answers.
        "turn_tls_addr": f"auto:{lab.get('turn_tls_port', 5349)}",
        "ca_file": lab.get("ca_file"),
        "turn_secret_file": lab.get("turn_secret_file"),
        # Without --acme, Caddy uses the site certificate the lab wrote (it covers *.base).
        "tls_mode": "files",
        "tls_cert_file": files.get("site_cert"),
        "tls_key_file": files.get("site_key"),
        "caddyfile": files.get("caddyfile", "/etc/caddy/Caddyfile"),
        # Debian's Caddy 2.6 has no proxy_protocol listener: preflight would refuse it.
        "proxy_protocol": False,
    }
    acme = lab.get("acme")
    if acme:
        # `lab up --acme`: Caddy obtains every certificate from the lab's pebble, as in
        # production.
        data.update({
            "tls_mode": "acme", "tls_cert_file": None, "tls_key_file": None,
            "acme_ca": acme["directory"], "acme_ca_root": acme["directory_root"],
        })
    return lab["name"], data


_hosts = [_host(lab) for lab in _status()]
if os.environ.get("ORAMA_LAB_CANARY") == "0":
    fleet = _hosts
elif len(_hosts) > 1:
    canary = _hosts[:1]
    fleet = _hosts[1:]
else:
    canary = _hosts
    if os.environ.get("ORAMA_LAB_ROLE") == "fleet":
        fleet = [(f"{_hosts[0][0]}-fleet", dict(_hosts[0][1]))]
