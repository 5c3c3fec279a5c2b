"""Opening the connection to a backend: the one place a backend socket is made.

`open_backend` gets the client's address too, so a dial from the client's own address
(IP_TRANSPARENT) is a change here and nowhere else.
"""

from __future__ import annotations

import _socket
import errno
import socket

from orama_stealth.router import transparent

# connect(2) results that mean "in progress" rather than failed, on a non-blocking socket.
IN_PROGRESS = (0, errno.EINPROGRESS, errno.EAGAIN, errno.EINTR)


def open_backend(
    family: int, sockaddr: tuple[str, int], client: tuple[str, int], source: str = "router"
) -> tuple[_socket.socket, int]:
    """A non-blocking socket connecting to `sockaddr`, and connect(2)'s error number: 0 when it
    connected inside the call (a loopback backend usually does), EINPROGRESS while the handshake
    runs, else the failure. `source: client` dials from the client's own address
    (router/transparent.py). Raises OSError when no socket could be made."""
    # The C socket type: socket.socket's Python layer (io refs, enum properties) is never used,
    # and the object is dropped once connected anyway.
    s = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if source == "client":
        try:
            transparent.bind_client_source(s, family, client[0], client[1])
        except OSError as e:
            s.close()
            raise OSError(e.errno, f"source client {client[0]}: {e} (needs CAP_NET_ADMIN)"
                          ) from None
    return s, s.connect_ex(sockaddr)
