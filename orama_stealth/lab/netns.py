"""The node's private link: a network namespace joined to the host by a veth pair.

The node gets no default route, so it cannot reach the internet or a package registry,
like many production nodes this product serves.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from pathlib import Path

NETNS_DIR = Path("/run/netns")


class NetError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise NetError(f"ip {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def link_exists(ifname: str) -> bool:
    return _ip("link", "show", "dev", ifname, check=False).returncode == 0


def subnet_users(subnet: ipaddress.IPv4Network) -> list[str]:
    """Host interfaces that already carry an address inside `subnet`."""
    out = _ip("-j", "-4", "addr", "show").stdout
    users: list[str] = []
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            net = ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False)
            if net.overlaps(subnet):
                users.append(str(link.get("ifname")))
    return users


def create(netns: str, host_if: str, host_ip: str, node_ip: str, prefix: int) -> None:
    """netns + veth (host end `host_if`, node end `eth0`), both ends addressed and up."""
    _ip("netns", "add", netns)
    _ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns)
    _ip("addr", "add", f"{host_ip}/{prefix}", "dev", host_if)
    _ip("link", "set", host_if, "up")
    _ip("-n", netns, "addr", "add", f"{node_ip}/{prefix}", "dev", "eth0")
    _ip("-n", netns, "link", "set", "eth0", "up")
    _ip("-n", netns, "link", "set", "lo", "up")


def destroy(netns: str, host_if: str | None) -> list[str]:
    """Remove the namespace, which takes the veth pair (and so `host_if`) with it.

    The host end is never deleted by name: an interface of that name that outlives our
    namespace belongs to someone else. Idempotent; returns what it removed, for the log.
    """
    removed: list[str] = []
    if netns_exists(netns):
        _ip("netns", "del", netns, check=False)
        removed.append(f"netns:{netns}")
        if host_if:
            # The pair goes with the namespace's last reference, which can lag a moment.
            deadline = time.monotonic() + 2.0
            while link_exists(host_if) and time.monotonic() < deadline:
                time.sleep(0.02)
    unmount_netns_dir_if_empty()
    return removed


def unmount_netns_dir_if_empty() -> None:
    """`ip netns add` bind-mounts /run/netns onto itself; undo it once no namespace is left.

    A plain (not lazy) umount fails while any namespace is mounted below, so this can never
    pull the directory from under someone else's namespace.
    """
    if not NETNS_DIR.is_dir() or any(NETNS_DIR.iterdir()):
        return
    if _is_mountpoint(NETNS_DIR):
        subprocess.run(["umount", str(NETNS_DIR)], capture_output=True, stdin=subprocess.DEVNULL)


def _is_mountpoint(path: Path) -> bool:
    target = str(path.resolve())
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            return any(line.split()[4] == target for line in f)
    except OSError:
        return False
