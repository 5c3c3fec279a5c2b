"""Where the router reaches the TURN server's TLS listener: a non-loopback address of the node.

A TURN server reports the address a client connected from as the XOR-MAPPED-ADDRESS. When the
router dials it over 127.0.0.1, every client is "127.0.0.1", and Firefox rejects that answer
(no relay candidate), so the router's TURN routes must point at an address of the node that is
not loopback. `turn_tls_addr: auto:PORT` (the default) finds it on the node: the listener's own
address, or for a wildcard listener the node's global address.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shlex
from dataclasses import dataclass, field

from pyinfra.api.facts import FactBase

from orama_stealth.deploy.settings import NodeSettings

AUTO = "auto"
FIX = ("make the TURN server listen for TLS on the node's own address too (coturn: a "
       "listening-ip=<node address> line beside 127.0.0.1, or no listening-ip at all) and "
       "restart it; then leave turn_tls_addr at auto:<port> (the default)")

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class TurnTlsListeners:
    """What the node says about the TURN TLS port: listening addresses and its own addresses."""

    listen: list[str] = field(default_factory=list)   # ss local addresses, e.g. 0.0.0.0, [::1]
    node_addrs: list[str] = field(default_factory=list)  # global-scope addresses of the node


class TurnTlsListenersFact(FactBase[TurnTlsListeners]):
    """Addresses listening on the TURN TLS port and the node's global addresses (`ss`, `ip`)."""

    @staticmethod
    def default() -> TurnTlsListeners:
        return TurnTlsListeners()

    def command(self, port: int = 5349) -> str:
        return (f"ss -ltnH {shlex.quote(f'sport = :{int(port)}')} 2>/dev/null"
                " | awk '{print \"listen=\" $4}'; "
                "ip -o addr show scope global 2>/dev/null | awk '{print \"addr=\" $4}'; true")

    def process(self, output: list[str]) -> TurnTlsListeners:
        return parse_listeners(output)


def parse_listeners(lines: list[str]) -> TurnTlsListeners:
    found = TurnTlsListeners()
    for line in lines:
        key, _, value = line.strip().partition("=")
        if key == "listen" and value:
            host = value.rsplit(":", 1)[0]
            found.listen.append(host[1:-1] if host.startswith("[") else host)
        elif key == "addr" and value:
            found.node_addrs.append(value.split("/", 1)[0])
    return found


def _ip(text: str) -> IP | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def usable_addresses(found: TurnTlsListeners) -> list[str]:
    """Non-loopback addresses where the TURN TLS listener accepts, IPv4 first."""
    out: list[str] = []
    node = [ip for ip in (_ip(a) for a in found.node_addrs)
            if ip is not None and not ip.is_loopback and not ip.is_link_local]
    for host in found.listen:
        if host in ("*", "0.0.0.0", "::"):
            # `*` and `[::]` (dual stack) take both families; 0.0.0.0 IPv4 only.
            out += [str(ip) for ip in node if host != "0.0.0.0" or ip.version == 4]
            continue
        ip = _ip(host)
        if ip is not None and not ip.is_loopback and not ip.is_unspecified \
                and not ip.is_link_local:
            out.append(str(ip))
    unique = list(dict.fromkeys(out))
    return sorted(unique, key=lambda a: (ipaddress.ip_address(a).version))


def choose(s: NodeSettings, found: TurnTlsListeners,
           strict: bool = True) -> tuple[str | None, str | None]:
    """(host:port for the router's TURN routes, None) or (None, why not with the fix).

    Preflight is strict. After it (`strict=False`) a TURN server that stopped listening in the
    meantime still gets a route to the node's own address, so the run goes on to verify, which
    fails and rolls back, instead of crashing between two steps."""
    host, _, port = s.turn_tls_addr.rpartition(":")
    if host != AUTO:
        ip = _ip(host.strip("[]"))
        if ip is not None and (ip.is_loopback or ip.is_unspecified):
            return None, (f"turn_tls_addr {s.turn_tls_addr} is a loopback address: the TURN "
                          "server would see every client as that address and Firefox rejects "
                          f"its answers (no relay candidate); set turn_tls_addr: auto:{port} "
                          "(the deploy finds the node's non-loopback TLS listener) or the "
                          "node's own address")
        return s.turn_tls_addr, None
    if not found.listen:
        fallback = usable_addresses(TurnTlsListeners(["*"], found.node_addrs))
        if not strict and fallback:
            best = s.probe_address if s.probe_address in fallback else fallback[0]
            return (f"[{best}]:{port}" if ":" in best else f"{best}:{port}"), None
        return None, f"the TURN server's TLS port {port} is not listening (turn_tls_addr auto)"
    addrs = usable_addresses(found)
    if not addrs:
        where = ", ".join(dict.fromkeys(found.listen))
        return None, (f"the TURN server's TLS port {port} listens on loopback only ({where}): "
                      "through the router every client would be 127.0.0.1 to it and Firefox "
                      f"fails; {FIX}")
    # The address this machine reaches the node by is the one its clients use too.
    best = s.probe_address if s.probe_address in addrs else addrs[0]
    return (f"[{best}]:{port}" if ":" in best else f"{best}:{port}"), None


def resolved(s: NodeSettings, addr: str) -> NodeSettings:
    return dataclasses.replace(s, turn_tls_addr=addr)


def answers_tls(addr: str, timeout: float = 3.0) -> str:
    """A command for the node printing `tls-ok` when a TLS handshake with `addr` completes (any
    certificate: the probes check the chain through :443 afterwards), else the error."""
    host, _, port = addr.rpartition(":")
    code = ("import socket,ssl,sys\n"
            "c=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT);c.check_hostname=False;"
            "c.verify_mode=ssl.CERT_NONE\n"
            f"s=socket.create_connection(({host.strip('[]')!r},{int(port)}),timeout={timeout})\n"
            "c.wrap_socket(s).close();print('tls-ok')\n")
    return f"timeout {int(timeout) + 2} python3 -c {shlex.quote(code)} 2>&1 | tail -n 1"
