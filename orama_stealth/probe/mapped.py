"""Is the XOR-MAPPED-ADDRESS a TURN server returned one a browser accepts?

The server reports the address it saw the client connect from. Firefox's ICE agent rejects an
Allocate response whose mapped address is loopback or unspecified ("XOR-MAPPED-ADDRESS is
bogus") and gets no relay candidate; Chromium ignores the address. A TURN server behind a
local proxy (the SNI router dialling it over 127.0.0.1) reports loopback for every client, so
the relay works for one browser and silently fails for the other.
"""

from __future__ import annotations

import ipaddress

FIX = ("fix: point the router's TURN backend at the node's non-loopback address where the TURN "
       "server's TLS listener answers (turn_tls_addr auto, the deploy's default), or use the "
       "real-address mode (turn_source: client)")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def mapped_problem(mapped: tuple[str, int] | None, local_ip: str | None) -> str | None:
    """Why a browser would reject this mapped address, or None when it is usable.

    `local_ip` is the prober's own address on the TLS connection: a prober that itself
    connects over loopback is rightly seen as loopback, which says nothing about browsers.
    """
    if mapped is None:
        return "the Allocate response has no XOR-MAPPED-ADDRESS (Firefox needs one)"
    ip = _ip(mapped[0])
    if ip is None:
        return f"XOR-MAPPED-ADDRESS {mapped[0]!r} is not an IP address"
    local = _ip(local_ip) if local_ip else None
    seen = f"the TURN server saw this client as {mapped[0]}"
    me = f" but it connected from {local_ip}" if local_ip else ""
    if ip.is_loopback:
        if local is not None and local.is_loopback:
            return None
        return (f"{seen} (loopback){me}: Firefox rejects such an Allocate response "
                "('XOR-MAPPED-ADDRESS is bogus') and gets no relay candidate, Chromium "
                f"connects; {FIX}")
    if ip.is_unspecified:
        return (f"{seen} (unspecified address){me}: Firefox rejects such an Allocate response "
                f"and gets no relay candidate; {FIX}")
    if ip.is_multicast or (isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address(
            "255.255.255.255")) or mapped[1] == 0:
        return (f"{seen}:{mapped[1]}, not a unicast address and port a client can have{me}: "
                f"browsers cannot use it; {FIX}")
    return None
