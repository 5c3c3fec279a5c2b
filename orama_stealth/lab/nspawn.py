"""Boot and stop one systemd-nspawn container, tracked by the PID of its nspawn process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


class NspawnError(RuntimeError):
    pass


# Hierarchies a container's systemd manages (hybrid v1 + v2 here, or v2 alone elsewhere).
_CGROUP_MOUNTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"),
                  Path("/sys/fs/cgroup"))
_CGROUP_PARENT = "orama-lab"


def _cgroup_dirs(machine: str) -> list[Path]:
    return [m / _CGROUP_PARENT / machine for m in _CGROUP_MOUNTS
            if (m / "cgroup.procs").exists()]


def _own_cgroup(machine: str) -> list[Path]:
    """A cgroup of the node's own in every hierarchy. Without one, every node started by the
    same process shares its cgroup, so their systemds build one /system.slice/caddy.service
    between them, and one node stopping Caddy kills another's (status=219/CGROUP)."""
    dirs = _cgroup_dirs(machine)
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    return dirs


def release_cgroup(machine: str) -> None:
    """Remove the node's cgroups once its processes are gone (deepest first; a busy one stays)."""
    for top in _cgroup_dirs(machine):
        if not top.is_dir():
            continue
        for d in sorted((p for p in top.rglob("*") if p.is_dir()),
                        key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def boot(root: Path, machine: str, netns_path: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start `systemd-nspawn --boot` detached from our terminal and session.

    The host has no system bus, hence `--register=no --keep-unit`; `--console=passive` and
    stdin from /dev/null let it run without a terminal (CI, a pytest process).
    """
    argv = [
        "systemd-nspawn", "--boot", "--quiet",
        f"--directory={root}", f"--machine={machine}",
        f"--network-namespace-path={netns_path}",
        # Root on a real node may change routing (the router's real-address mode needs policy
        # routing); nspawn drops CAP_NET_ADMIN unless asked.
        "--capability=CAP_NET_ADMIN",
        "--register=no", "--keep-unit", "--link-journal=no", "--console=passive",
    ]
    cgroups = [str(d / "cgroup.procs") for d in _own_cgroup(machine)]

    def enter_cgroups() -> None:  # runs in the child, before exec
        for procs in cgroups:
            with open(procs, "w") as fh:
                fh.write(str(os.getpid()))

    # The node has a network namespace of its own, so its /proc/sys/net is its own too: a
    # real node's root sets net.* sysctls (the cutover sets net.ipv4.tcp_migrate_req), which
    # nspawn mounts read-only unless told.
    env = {**os.environ, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=enter_cgroups, env=env,
        )


def is_ours(pid: int, machine: str) -> bool:
    """True if `pid` is a live (not zombie) systemd-nspawn for `machine`; guards PID reuse."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        return False
    return (
        bool(cmdline) and cmdline[0].endswith(b"systemd-nspawn")
        and f"--machine={machine}".encode() in cmdline
    )


def find(machine: str, root: Path) -> list[int]:
    """nspawn processes booting `root` as `machine`: finds one whose PID was never recorded
    (the starting process died between spawning it and writing the PID down)."""
    want = [f"--machine={machine}".encode(), f"--directory={root}".encode()]
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(w in cmdline for w in want) and is_ours(int(d.name), machine):
            pids.append(int(d.name))
    return pids


def _reap(pid: int) -> None:
    # Only our own child can be reaped; for a PID started by an earlier CLI run this is a no-op.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop(pid: int, machine: str, timeout: float = 30.0) -> str:
    """SIGTERM (nspawn turns it into a clean halt of the node's systemd), SIGKILL on timeout.

    Returns how it ended: "absent", "halted" or "killed".
    """
    _reap(pid)
    if not is_ours(pid, machine):
        return "absent"
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not is_ours(pid, machine):
            release_cgroup(machine)
            return "halted"
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        _reap(pid)
        if not is_ours(pid, machine):
            release_cgroup(machine)
            return "killed"
        time.sleep(0.05)
    raise NspawnError(f"systemd-nspawn pid {pid} for {machine} survived SIGKILL")
