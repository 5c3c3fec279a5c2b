"""Caddy's ACME account files must parse, or Caddy obtains no certificate at all.

Caddy 2.6 (certmagic before its atomic file writes) saves a file by truncating and rewriting
it in place, and registers the account once per name it is obtaining while no account is
stored. Two such saves of `acme/<ca>/users/<email>/<email>.json` that overlap leave the
longer one's tail behind the shorter one (a stray `}` after the JSON), and from then on every
obtain fails on the account until the file is moved away. Preflight names such a file
before the cutover touches anything.
"""

from __future__ import annotations

import shlex

# The check runs on the node; python3 is there (the router runs on it), json.tool would
# print the whole account.
DEFAULT_STORAGE = "/var/lib/caddy/.local/share/caddy"  # Debian's caddy.service (HOME)
_PARSE = "import json, sys; json.load(open(sys.argv[1], encoding='utf-8'))"


def check_command(storage: str) -> str:
    glob = f"{shlex.quote(storage.rstrip('/'))}/acme/*/users/*/*.json"
    return (f"for f in {glob}; do [ -f \"$f\" ] || continue; "
            f"python3 -c {shlex.quote(_PARSE)} \"$f\" 2>/dev/null || echo \"bad=$f\"; done; "
            "echo checked=yes")


def problems(output: str) -> list[str]:
    """One problem per account file that does not parse; one if the check did not finish."""
    lines = output.splitlines()
    found = []
    for line in lines:
        if line.startswith("bad="):
            path = line[len("bad="):]
            key = path[:-len(".json")] + ".key"
            found.append(
                f"Caddy's ACME account file {path} is not valid JSON (two saves at once tore "
                f"it), so Caddy obtains no certificate with it; move it and {key} aside (mv "
                f"{path} {path}.broken; mv {key} {key}.broken) and run `systemctl reload "
                "caddy`: Caddy registers a new account with the CA")
    if "checked=yes" not in lines:
        found.append(f"could not check Caddy's ACME account files: {output.strip() or 'no output'}")
    return found
