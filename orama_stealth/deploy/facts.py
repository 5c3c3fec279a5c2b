"""pyinfra facts: what the cutover steps decide on, gathered in one SSH round trip."""

from __future__ import annotations

import base64
import json
import shlex
from dataclasses import dataclass, field
from typing import Any

from pyinfra.api.facts import FactBase

from orama_stealth.deploy import layout

ROUTER_PROCESS_NAMES = ("orama-sni-route", "python3", "python")  # comm is cut at 15 chars


@dataclass
class Snapshot:
    """The parts of a node's state that cutover, rollback and verify decide on."""

    caddy_active: bool = False
    router_active: bool = False
    router_enabled: bool = False
    router_unit: bool = False
    caddy_dropin: bool = False
    caddyfile_managed: bool = False
    caddy_needs_reload: bool = False
    backup: str | None = None
    installed: str | None = None
    caddy_proxy_protocol: bool = False
    nft: bool = False  # the switch's redirect needs nftables (deploy/handover.py)
    # The running router writes its reload outcome to a status file: it upgrades in place on
    # reload. One started from an earlier release does not, and needs one restart.
    router_in_place: bool = False
    # port -> process names listening on it (any address)
    listeners: dict[int, set[str]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    # The script's last line arrived: a read cut short by a time-out never looks like a node
    # with nothing running.
    complete: bool = False

    def owners(self, port: int) -> set[str]:
        return self.listeners.get(port, set())

    def caddy_on(self, port: int) -> bool:
        return "caddy" in self.owners(port)

    def router_on(self, port: int) -> bool:
        return bool(self.owners(port) & set(ROUTER_PROCESS_NAMES)) and self.router_active

    @property
    def cut_over(self) -> bool:
        """Router owns :443/:80 and Caddy runs behind it with the current units."""
        return (self.router_active and self.router_on(443) and self.router_on(80)
                and self.caddy_active and not self.caddy_on(443) and not self.caddy_needs_reload)

    @property
    def before_state(self) -> bool:
        """Nothing of the cutover left: Caddy alone on :443/:80."""
        return (not self.router_active and not self.router_unit and not self.caddy_dropin
                and not self.caddyfile_managed and self.backup is None
                and self.caddy_active and self.caddy_on(443) and self.caddy_on(80))


def _script(caddyfile: str) -> str:
    cf = shlex.quote(caddyfile)
    return f"""
echo "caddy_active=$(systemctl is-active caddy.service 2>/dev/null)"
echo "router_active=$(systemctl is-active {layout.ROUTER_UNIT_NAME} 2>/dev/null)"
echo "router_enabled=$(systemctl is-enabled {layout.ROUTER_UNIT_NAME} 2>/dev/null)"
echo "caddy_needs_reload=$(systemctl show -P NeedDaemonReload caddy.service 2>/dev/null)"
for f in {layout.ROUTER_UNIT} {" ".join(layout.SOCKET_UNITS)}; do
  [ -e "$f" ] && echo router_unit=yes
done
[ -e {layout.CADDY_DROPIN} ] && echo caddy_dropin=yes
grep -q '^# >>> orama-stealth managed' {cf} 2>/dev/null && echo caddyfile_managed=yes
[ -e {layout.BACKUP_POINTER} ] && echo "backup=$(readlink {layout.BACKUP_POINTER})"
[ -e {layout.INSTALLED_MARK} ] && echo "installed=$(cat {layout.INSTALLED_MARK})"
caddy list-modules 2>/dev/null | grep -qx caddy.listeners.proxy_protocol \
  && echo caddy_proxy_protocol=yes
command -v nft >/dev/null 2>&1 && echo nft=yes
[ -e {layout.ROUTER_STATUS} ] && echo router_in_place=yes
ss -ltnpH 2>/dev/null | awk '{{print "listen=" $4 " " $6}}'
[ -e {layout.STATE_FILE} ] && echo "state=$(tr -d '\\n' < {layout.STATE_FILE})"
echo complete=yes
"""


def parse_snapshot(lines: list[str]) -> Snapshot:
    snap = Snapshot()
    for line in lines:
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if key == "listen":
            addr, _, users = value.partition(" ")
            port = addr.rsplit(":", 1)[-1]
            if port.isdigit():
                names = {part.split('"')[1] for part in users.split("((")[1:] if '"' in part}
                names |= {n.split('"')[1] for n in users.split("),(") if n.count('"') >= 2}
                snap.listeners.setdefault(int(port), set()).update(names)
        elif key == "state":
            try:
                loaded = json.loads(value)
            except json.JSONDecodeError:
                loaded = {"state": "unreadable"}
            snap.state = loaded if isinstance(loaded, dict) else {"state": "unreadable"}
        elif key in ("caddy_active", "router_active"):
            setattr(snap, key, value == "active")
        elif key == "router_enabled":
            snap.router_enabled = value == "enabled"
        elif key in ("router_unit", "caddy_dropin", "caddyfile_managed", "caddy_needs_reload",
                     "caddy_proxy_protocol", "nft", "router_in_place", "complete"):
            setattr(snap, key, value == "yes")
        elif key in ("backup", "installed"):
            setattr(snap, key, value or None)
    return snap


class NodeSnapshot(FactBase[Snapshot]):
    """Units, listeners, managed files, backup pointer and state file of an Orama node."""

    @staticmethod
    def default() -> Snapshot:
        return Snapshot()

    def command(self, caddyfile: str = layout.DEFAULT_CADDYFILE) -> str:
        return _script(caddyfile)

    def process(self, output: list[str]) -> Snapshot:
        return parse_snapshot(output)


class TextFile(FactBase[str | None]):
    """A file's full text, "" when it does not exist, None when it could not be read (a
    time-out must not look like an empty file). Base64 on the wire keeps the text exact."""

    @staticmethod
    def default() -> str | None:
        return None

    def command(self, path: str) -> str:
        q = shlex.quote(path)
        return f"if [ -f {q} ]; then echo b64:$(base64 -w0 {q}); else echo absent; fi"

    def process(self, output: list[str]) -> str | None:
        for line in output:
            if line.startswith("b64:"):
                return base64.b64decode(line[4:]).decode("utf-8", "replace")
            if line == "absent":
                return ""
        return None
