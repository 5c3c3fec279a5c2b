"""CPU time, memory and descriptors of a process and all its descendants, read from /proc.

A proxy may fork workers, so every figure covers the whole tree: live processes plus the
CPU time the kernel already folded into parents for children that have exited.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICK = float(os.sysconf("SC_CLK_TCK"))


@dataclass(frozen=True, slots=True)
class TreeSample:
    cpu_s: float  # utime+stime of every live process in the tree, plus reaped children's
    sys_s: float  # the stime part: kernel work (syscalls, TCP, copies) on the tree's behalf
    rss_kib: int  # sum of VmRSS over the tree
    sockets: int  # socket descriptors open across the tree
    pids: tuple[int, ...]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ")".
    return text[text.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """root and every process below it (scan of /proc, parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _socket_count(pid: int) -> int:
    n = 0
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(fd.path).startswith("socket:"):
                    n += 1
            except OSError:
                continue
    except OSError:
        return 0
    return n


def sample(root: int, *, sockets: bool = False) -> TreeSample:
    pids = descendants(root)
    ticks = 0
    sys_ticks = 0
    rss = 0
    socks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # Fields after the command: [11] utime [12] stime [13] cutime [14] cstime (0-based here).
        ticks += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        sys_ticks += int(fields[12]) + int(fields[14])
        rss += _rss_kib(pid)
        if sockets:
            socks += _socket_count(pid)
    return TreeSample(cpu_s=ticks / _TICK, sys_s=sys_ticks / _TICK, rss_kib=rss, sockets=socks,
                      pids=tuple(pids))
