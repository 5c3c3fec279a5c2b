"""Dial a backend from the client's own address (`source: client`), like HAProxy's
`usesrc clientip`.

A TURN server reports the address it sees as the client's XOR-MAPPED-ADDRESS and keeps its
logs and per-address limits by it; through a plain proxy that is the proxy's address for
everyone. With IP_TRANSPARENT (needs CAP_NET_ADMIN) a socket may bind an address that is not
local, so the connection to the backend carries the client's address and port. The node must
steer the backend's replies back to this socket: policy routing (a fwmark rule and a `local`
route in a table of its own), which the deploy installs (orama_stealth/deploy/transparent.py).
"""

from __future__ import annotations

import _socket
import errno
import socket

# Linux values; the socket module has IP_TRANSPARENT from Python 3.11 on some builds only.
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
SOURCES = ("router", "client")


def _plain_ipv4(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") else ip


def bind_client_source(sock: _socket.socket, family: int, client_ip: str,
                       client_port: int) -> None:
    """Before connect(2): bind `sock` to the client's address and port, so the backend sees
    exactly the client's transport address. When that pair is still taken towards the backend
    (the client reused its port while our old connection is closing) any port will do: the
    address is what logs and limits key on."""
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        ip = client_ip
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        ip = _plain_ipv4(client_ip)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((ip, client_port))
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        sock.bind((ip, 0))
