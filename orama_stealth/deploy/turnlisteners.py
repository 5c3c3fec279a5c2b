"""One TURN TLS listener per stealth name (tls_mode acme), each serving Caddy's certificate for
its own name.

coturn serves one certificate (no SNI selection) and Caddy obtains one per name. So the main
TURN server serves the certificate of `turn_cert_name` (default the first cdn name) on its own
TLS port, and every other cdn name gets a coturn instance of its own
(`orama-turn-tls@<name>.service`) that listens for TLS only, with that name's certificate, on
a port of its own; the router sends each name to its listener. The instances share the main
TURN server's realm, secret and addresses (so REST credentials work on all of them) and each
has a slice of the relay port range of its own.

Ports: the listeners sit in `turn_listener_slots` slots; slot k is TLS port
`turn_listener_port + 2k` (default the main TLS port + 2) and, as coturn always does, the next
port as its alternate TLS port, plus relay slice k. A name keeps its slot for as long as it is
in the inventory: the deploy reads the slots the node's instances hold (`ListenerPortsFact`,
their configs' `tls-listening-port`), keeps every existing name in its slot, gives each new
name the lowest free one and frees the slot of a removed name. So adding or removing a
namespace never moves (and never restarts) any other name's listener.

Relay ports: two coturn processes allocating from one range would race for the same ports,
so the range is split once, when the deploy first manages the TURN server: the main TURN
server keeps the lower half, the upper half is cut into `turn_listener_slots` equal slices,
one per instance. The split does not depend on the number of names, so adding a namespace
never restarts the main TURN server.

Pure functions and values, and the fact reading the node's slots: the router config
(deploy/ops/common.py), preflight and the TURN certificate operations (deploy/turncert.py) all
plan from the same assignment.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pyinfra.api.facts import FactBase

from orama_stealth.deploy.settings import HostDataLike, NodeSettings, SettingsError

INSTANCE_UNIT = "orama-turn-tls@.service"
TLS_DIR = "/etc/orama/turn-tls"  # an instance's config: <TLS_DIR>/<name>/turnserver.conf
DEFAULT_SLOTS = 8
DEFAULT_RELAY = (49152, 65535)  # coturn's own min-port/max-port defaults (RFC 5766)
MIN_SLICE = 64  # relay ports per instance below which the split is refused
# Keys of the main TURN server's config an instance must not copy: it listens for TLS only on
# its own ports, with its own certificate and relay range, and has no CLI or metrics port
# that would collide with the main server's.
INSTANCE_DROP = frozenset({
    "listening-port", "tls-listening-port", "alt-listening-port", "alt-tls-listening-port",
    "cert", "pkey", "min-port", "max-port", "no-udp", "no-tcp", "no-tls", "no-dtls",
    "cli-ip", "cli-port", "cli-password", "cli-max-output-sessions", "no-cli",
    "prometheus", "prometheus-port", "web-admin", "web-admin-ip", "web-admin-port",
    "web-admin-listen-on-workers", "pidfile", "tcp-proxy-port", "aux-server",
    "udp-self-balance", "daemon",
})


@dataclass(frozen=True, slots=True)
class Listener:
    name: str  # the cdn name whose certificate this listener serves
    port: int  # its TLS port (the router's route for `name` points here)
    instance: bool  # an orama-turn-tls@ instance; False: the main TURN server
    slot: int = -1  # an instance's slot: its port's offset and its relay slice (see above)

    @property
    def unit(self) -> str:
        return f"orama-turn-tls@{self.name}.service"


@dataclass(frozen=True, slots=True)
class ListenerPlan:
    main_name: str
    main_port: int
    base_port: int
    slots: int
    managed: bool  # tls_mode acme and the TURN server takes Caddy's certificates
    listeners: tuple[Listener, ...]

    def port_of(self, name: str) -> int:
        for li in self.listeners:
            if li.name == name:
                return li.port
        return self.main_port

    @property
    def instances(self) -> tuple[Listener, ...]:
        return tuple(li for li in self.listeners if li.instance)

    def ports_in_use(self) -> list[int]:
        """Every TCP port the instances listen on (TLS and coturn's alternate TLS port)."""
        return [p for li in self.instances for p in (li.port, li.port + 1)]


def _int(s: NodeSettings, data: HostDataLike, key: str, default: int, low: int) -> int:
    raw = data.get(key, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = low - 1
    if value < low or value > 65535:
        raise SettingsError(f"host {s.host}: {key}: expected an integer >= {low}, got {raw!r}")
    return value


def main_name(s: NodeSettings, data: HostDataLike) -> str:
    value = data.get("turn_cert_name", s.cdn_hosts[0])
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
        raise SettingsError(f"host {s.host}: turn_cert_name: expected a non-empty word, got "
                            f"{value!r}")
    name = value.strip().lower().rstrip(".")
    if name not in s.cdn_hosts:
        raise SettingsError(f"host {s.host}: turn_cert_name: {name!r} is not one of the cdn "
                            f"names {list(s.cdn_hosts)}")
    return name


def from_caddy(s: NodeSettings, data: HostDataLike) -> bool:
    value = data.get("turn_cert_from_caddy", True)
    if not isinstance(value, bool):
        raise SettingsError(f"host {s.host}: turn_cert_from_caddy: expected true or false, got "
                            f"{value!r}")
    return value


def assign(names: Sequence[str], held: Mapping[str, int], base: int,
           slots: int) -> dict[str, int]:
    """name -> slot for the instances' `names`. `held`: name -> TLS port of the instances on
    the node. A name keeps the slot its port is in (the first in `names` order when two claim
    one); the others take the lowest free slots in `names` order. Slots of names no longer in
    `names` are free. More names than slots: the caller refuses."""
    taken: dict[str, int] = {}
    for name in names:
        port = held.get(name)
        if port is None or (port - base) % 2:
            continue
        k = (port - base) // 2
        if 0 <= k < slots and k not in taken.values():
            taken[name] = k
    free = (k for k in range(slots) if k not in taken.values())
    return {name: taken[name] if name in taken else next(free, -1) for name in names}


def plan(s: NodeSettings, data: HostDataLike,
         held: Mapping[str, int] | None = None) -> ListenerPlan:
    """Which listener serves which name. `held`: name -> TLS port of the instances on the node
    (ListenerPortsFact; none: a node without instances). Without managed certificates every
    name stays on the main TURN server (the operator gave it a certificate covering them)."""
    first = main_name(s, data)
    managed = s.tls_mode == "acme" and from_caddy(s, data)
    main_port = s.turn_tls_port
    base = _int(s, data, "turn_listener_port", main_port + 2, 1)
    slots = _int(s, data, "turn_listener_slots", DEFAULT_SLOTS, 0)
    listeners = [Listener(first, main_port, False)]
    if managed:
        extra = [n for n in s.cdn_hosts if n != first]
        if len(extra) > slots:
            raise SettingsError(
                f"host {s.host}: turn_listener_slots: {len(extra)} cdn names besides "
                f"{first} need a TURN TLS listener each, but only {slots} slots are set (raise "
                "turn_listener_slots; the relay port range is split into that many slices)")
        if extra and s.turn_source == "client":
            raise SettingsError(
                f"host {s.host}: turn_source: client catches the TURN server's replies on one "
                f"port only, so it takes one cdn name in tls_mode acme; {len(extra) + 1} are "
                "set (use turn_source: router, or turn_cert_from_caddy: false with a "
                "certificate covering every name)")
        slot = assign(extra, held or {}, base, slots)
        ports = sorted(base + 2 * k for k in slot.values())
        if ports and (ports[-1] + 1 > 65535 or any(
                p <= main_port + 1 and main_port <= p + 1 for p in ports)):
            raise SettingsError(
                f"host {s.host}: turn_listener_port: {base} gives the listeners ports "
                f"{ports[0]}-{ports[-1] + 1}, which must stay below 65536 and clear of the "
                f"main TURN server's TLS ports {main_port}-{main_port + 1}")
        listeners += [Listener(n, base + 2 * slot[n], True, slot[n]) for n in extra]
    return ListenerPlan(first, main_port, base, slots, managed, tuple(listeners))


@dataclass
class HeldPorts:
    ports: dict[str, int] = field(default_factory=dict)  # name -> its instance's TLS port
    complete: bool = False  # the read ran to its end (a failed read must not free slots)


class ListenerPortsFact(FactBase[HeldPorts]):
    """The TLS port of every instance config on the node (`tls-listening-port`, the line
    instance_conf writes), by the name of its directory."""

    @staticmethod
    def default() -> HeldPorts:
        return HeldPorts()

    def command(self) -> str:
        glob = f"{shlex.quote(TLS_DIR)}/*/turnserver.conf"
        return (f'for f in {glob}; do [ -f "$f" ] || continue; d=${{f%/*}}; '
                "echo \"port=${d##*/}=$(sed -n 's/^tls-listening-port=\\([0-9]*\\)$/\\1/p' "
                '"$f" | tail -n1)"; done; echo complete=yes')

    def process(self, output: list[str]) -> HeldPorts:
        return parse_held(output)


def parse_held(lines: list[str]) -> HeldPorts:
    held = HeldPorts()
    for line in lines:
        key, _, value = line.strip().partition("=")
        name, _, port = value.rpartition("=")
        if key == "port" and name and port.isdigit():
            held.ports[name] = int(port)
        elif key == "complete":
            held.complete = True
    return held


# ---- turnserver.conf texts ------------------------------------------------------------------


def conf_key(line: str) -> str:
    """The option a turnserver.conf line sets ('' for comments and blank lines)."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return ""
    return stripped.lstrip("-").split("=", 1)[0].strip()


def relay_range(conf_text: str) -> tuple[int, int]:
    """The main TURN server's own min-port/max-port (coturn's defaults when unset)."""
    lo, hi = DEFAULT_RELAY
    for line in conf_text.split("\n"):
        key = conf_key(line)
        value = line.split("=", 1)[1].strip() if "=" in line else ""
        if key == "min-port" and value.isdigit():
            lo = int(value)
        elif key == "max-port" and value.isdigit():
            hi = int(value)
    return lo, hi


def split_relay(lo: int, hi: int, slots: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """(main server's range, one range per slot): the main keeps the lower half."""
    if slots == 0:
        return (lo, hi), []
    size = (hi - lo + 1) // 2 // slots
    if size < MIN_SLICE:
        raise SettingsError(f"the TURN server's relay range {lo}-{hi} is too small to give "
                            f"{slots} listeners {MIN_SLICE} ports each (widen min-port/max-port "
                            "or lower turn_listener_slots)")
    top = hi - size * slots
    return (lo, top), [(top + 1 + k * size, top + (k + 1) * size) for k in range(slots)]


def instance_conf(main_conf: str, li: Listener, cert: str, key: str,
                  relay: tuple[int, int]) -> str:
    """An instance's config: the main server's (realm, secret, addresses, logging) without
    its listeners, certificate and relay range, plus its own."""
    kept = [line for line in main_conf.split("\n") if conf_key(line) not in INSTANCE_DROP]
    body = "\n".join(kept).rstrip("\n")
    return (f"# Written by deploys/cutover.py (orama-stealth), removed by deploys/rollback.py.\n"
            f"# TURN TLS listener for {li.name}: the main TURN server's settings, its own TLS\n"
            f"# port, Caddy's certificate for {li.name} and a relay port slice of its own.\n"
            f"{body}\n"
            "# >>> orama-stealth listener\n"
            f"tls-listening-port={li.port}\n"
            f"alt-tls-listening-port={li.port + 1}\n"
            "no-udp\nno-tcp\nno-dtls\nno-cli\n"
            f"cert={cert}\npkey={key}\n"
            f"min-port={relay[0]}\nmax-port={relay[1]}\n")


def port_problems(p: ListenerPlan, owners: Callable[[int], set[str]]) -> list[str]:
    """Preflight: the instances' ports are free, or held by a TURN server (theirs, on a
    re-run). `owners(port)` gives the names of the processes listening there."""
    problems = []
    for li in p.instances:
        for port in (li.port, li.port + 1):
            others = owners(port) - {"turnserver"}
            if others:
                problems.append(f"port {port} (TURN TLS listener for {li.name}) is taken by "
                                f"{', '.join(sorted(others))}; set turn_listener_port to a "
                                "free range")
    return problems
