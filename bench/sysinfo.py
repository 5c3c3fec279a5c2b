"""The machine and the versions a result was measured with; installs missing tools via apt."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# command -> Debian package providing it
TOOLS = {"haproxy": "haproxy", "nginx": "nginx-light", "wrk": "wrk", "curl": "curl"}
_SBIN = ("/usr/sbin", "/sbin")


def which(cmd: str) -> str | None:
    return shutil.which(cmd) or next(
        (f"{d}/{cmd}" for d in _SBIN if os.access(f"{d}/{cmd}", os.X_OK)), None
    )


def ensure_tools() -> None:
    """apt-get install the Debian packages of any missing tool (needs root or sudo)."""
    missing = sorted({pkg for cmd, pkg in TOOLS.items() if which(cmd) is None})
    if not missing:
        return
    prefix: list[str] = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if prefix and shutil.which("sudo") is None:
        raise SystemExit(f"bench: missing {', '.join(missing)}; install them with apt (as root)")
    print(f"bench: apt-get install {' '.join(missing)}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run([*prefix, "apt-get", "update", "-q"], check=True, env=env, timeout=600)
    subprocess.run([*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                   check=True, env=env, timeout=900)


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError as e:
        return f"unavailable ({e.strerror})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _pkg(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str | int]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {"cpu_model": model, "cores": os.cpu_count() or 0, "kernel": platform.release(),
            "memory_mib": mem_kib // 1024,
            "os": _first_line(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"])}


def _version(argv: list[str], pattern: str) -> str:
    line = _first_line(argv)
    m = re.search(pattern, line)
    return m.group(1) if m else line


def _commit(root: Path) -> str:
    """HEAD, marked "+dirty" when the router's sources differ from it (an editable install
    runs the working tree, not the commit)."""
    head = _first_line(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--", "orama_stealth"],
        capture_output=True, text=True, timeout=10, check=False,
    )
    return head + ("+dirty" if status.stdout.strip() else "")


def versions() -> dict[str, str]:
    root = Path(__file__).resolve().parent.parent
    return {
        "python": sys.version.split()[0],
        "orama_stealth": _pkg("orama-stealth"),
        "uvloop": _pkg("uvloop"),
        "git_commit": _commit(root),
        "haproxy": _version([which("haproxy") or "haproxy", "-v"], r"version (\S+)"),
        "nginx": _version([which("nginx") or "nginx", "-v"], r"nginx/(\S+)"),
        "openssl": _version(["openssl", "version"], r"OpenSSL (\S+)"),
        "wrk": _version([which("wrk") or "wrk", "-v"], r"wrk (?:debian/)?(\S+)"),
        "curl": _version(["curl", "--version"], r"curl (\S+)"),
    }
