"""The systemd protocols the router speaks, without libsystemd.

sd_notify is one AF_UNIX datagram per state change to $NOTIFY_SOCKET (a path, or `@name` for the
abstract namespace); socket activation is $LISTEN_PID/$LISTEN_FDS/$LISTEN_FDNAMES with the
descriptors starting at 3. Both are documented, stable wire formats, so a node needs no C library.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping

SD_LISTEN_FDS_START = 3


def notify_address(env: Mapping[str, str] | None = None) -> str | bytes | None:
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    if path.startswith("/"):
        return path
    return None  # vsock and other forms are not used by the router's unit


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=...") to systemd; False when not under systemd."""
    addr = notify_address(env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
        return True
    except OSError:
        return False


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd wants it with RELOADING=1."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading_message(status: str = "reloading configuration") -> str:
    return f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}\nSTATUS={status}"


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked for."""
    e = os.environ if env is None else env
    usec = e.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = e.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


class ListenFdsError(Exception):
    pass


def listen_fds(env: MutableMapping[str, str] | None = None) -> list[tuple[str, socket.socket]]:
    """Sockets passed by systemd (or a test), as (name, socket), in order.

    The variables are removed afterwards so worker processes never interpret them a second time.
    """
    e = os.environ if env is None else env
    pid_text = e.get("LISTEN_PID", "")
    count_text = e.get("LISTEN_FDS", "")
    names_text = e.get("LISTEN_FDNAMES", "")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        e.pop(key, None)
    if not count_text:
        return []
    if pid_text and pid_text != str(os.getpid()):
        return []  # meant for another process (e.g. inherited through a wrapper)
    if not count_text.isdigit():
        raise ListenFdsError(f"LISTEN_FDS: expected a number, got {count_text!r}")
    count = int(count_text)
    names = names_text.split(":") if names_text else []
    out: list[tuple[str, socket.socket]] = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        try:
            sock = socket.socket(fileno=fd)
        except OSError as err:
            raise ListenFdsError(f"LISTEN_FDS: descriptor {fd} is not a socket: {err}") from None
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] != "unknown" else ""
        out.append((name, sock))
    return out
