"""The local lab node (`orama-stealth lab up`): needs no editing, it asks the lab for its facts.

    orama-stealth lab up
    pyinfra -y inventories/lab.py deploys/cutover.py

The node is the canary. Environment (for tests):
  ORAMA_LAB_NAME=NAME     the lab node to use (default: the lab's default node)
  ORAMA_LAB_STATUS=FILE   read this `lab status --json` document instead of asking the lab
  ORAMA_LAB_ROLE=fleet    also list the node as the fleet host `<name>-fleet`, so the canary rule
                          can be exercised with one node (run with --limit <name>-fleet)
"""

import json
import os
import subprocess
import sys
import tempfile


def _status() -> dict:
    path = os.environ.get("ORAMA_LAB_STATUS")
    if path:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    name = os.environ.get("ORAMA_LAB_NAME")
    proc = subprocess.run(
        [sys.executable, "-m", "orama_stealth.stealth_cli", "lab", "status", "--json",
         *(["--name", name] if name else [])],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"inventories/lab.py: `orama-stealth lab status --json` failed "
                         f"(is the lab node up? `orama-stealth lab up`): {proc.stderr.strip()}")
    return json.loads(proc.stdout)


_lab = _status()
if not _lab.get("running", True):
    raise SystemExit("inventories/lab.py: the lab node is not running: `orama-stealth lab up`")

_files = _lab.get("node_files") or {}
_data = {
    "ssh_hostname": _lab["address"],
    "ssh_user": _lab.get("ssh_user", "root"),
    "ssh_key": _lab["ssh_key"],
    "ssh_known_hosts_file": _lab.get("known_hosts")
    or os.path.join(tempfile.gettempdir(), f"orama-lab-known-hosts-{_lab['name']}"),
    # Each lab boot may bring new host keys; the lab records them, new ones are accepted.
    "ssh_strict_host_key_checking": "accept-new",
    "probe_address": _lab["address"],
    "base_domain": _lab["base_domain"],
    "cdn_hosts": list(_lab.get("cdn_hosts") or []),
    # auto: the deploy finds the non-loopback address where coturn's TLS listener answers.
    "turn_tls_addr": f"auto:{_lab.get('turn_tls_port', 5349)}",
    "ca_file": _lab.get("ca_file"),
    "turn_secret_file": _lab.get("turn_secret_file"),
    # Without --acme, Caddy uses the site certificate the lab wrote (it covers *.base).
    "tls_mode": "files",
    "tls_cert_file": _files.get("site_cert"),
    "tls_key_file": _files.get("site_key"),
    "caddyfile": _files.get("caddyfile", "/etc/caddy/Caddyfile"),
    # Debian's Caddy 2.6 has no proxy_protocol listener: preflight would refuse it.
    "proxy_protocol": False,
}

_acme = _lab.get("acme")
if _acme:
    # `lab up --acme`: Caddy obtains every certificate from the lab's pebble, as in production.
    _data.update({
        "tls_mode": "acme", "tls_cert_file": None, "tls_key_file": None,
        "acme_ca": _acme["directory"], "acme_ca_root": _acme["directory_root"],
    })

canary = [(_lab["name"], _data)]
if os.environ.get("ORAMA_LAB_ROLE") == "fleet":
    fleet = [(f"{_lab['name']}-fleet", dict(_data))]
