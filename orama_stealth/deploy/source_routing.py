"""The real-address mode (`turn_source: client`): the TURN server sees each client's address.

The router binds its connection to the TURN server to the client's address and port with
IP_TRANSPARENT (orama_stealth/router/transparent.py, needs CAP_NET_ADMIN). The node routes the
TURN server's replies to those addresses back to itself with a policy rule and a `local` route
in a table of its own, held by a oneshot unit so they survive reboots and go with rollback.
The router reaches the TURN server on its alternate TLS port (coturn listens on the TLS port
+ 1 by default) so that only the router's connections are caught by the rule; clients keep
the main port.
"""

from __future__ import annotations

from orama_stealth.deploy import render
from orama_stealth.deploy.settings import NodeSettings

UNIT_NAME = "orama-stealth-source-routing.service"
UNIT = f"/etc/systemd/system/{UNIT_NAME}"
TABLE = 4052
SOURCES = ("router", "client")


def backend_addr(turn_tls_addr: str, source: str) -> str:
    """The TURN backend the router dials: the alternate TLS port in the real-address mode."""
    if source != "client":
        return turn_tls_addr
    host, _, port = turn_tls_addr.rpartition(":")
    return f"{host}:{int(port) + 1}"


def unit(s: NodeSettings, turn_tls_addr: str) -> str:
    host, _, port = backend_addr(turn_tls_addr, "client").rpartition(":")
    return render.render("orama-stealth-source-routing.service.j2", table=TABLE,
                         turn_addr=host.strip("[]"), turn_port=int(port))


def install(unit_text_path: str) -> str:
    """Install and start the unit (idempotent), from a staged file."""
    return "\n".join([
        "set -eu",
        f"if ! cmp -s {unit_text_path} {UNIT}; then",
        f"  mv {unit_text_path} {UNIT}",
        "  systemctl daemon-reload",
        f"  systemctl enable -q {UNIT_NAME}",
        f"  systemctl restart {UNIT_NAME}",
        "fi",
        f"systemctl is-active -q {UNIT_NAME} || systemctl start {UNIT_NAME}",
        f"ip rule show priority {TABLE} | grep -q 'lookup {TABLE}'",
    ])


def remove() -> str:
    """Rollback: stop (removes the rule and the table's route), disable, delete the unit."""
    return (f"if [ -e {UNIT} ]; then systemctl disable -q --now {UNIT_NAME} 2>/dev/null || true;"
            f" rm -f {UNIT}; fi; ip rule del priority {TABLE} 2>/dev/null || true;"
            f" ip route flush table {TABLE} 2>/dev/null || true")
