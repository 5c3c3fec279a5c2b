"""Which build of the router is this: the package version and a fingerprint of its source.

The fingerprint is a hash of every `.py` file of the installed `orama_stealth` package (paths
and contents), so a changed checkout with an unchanged version number is a different build. The
supervisor computes it once at start (the code it runs) and again on SIGHUP (the code on disk):
a difference is what triggers an upgrade (`handover`).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import orama_stealth

PACKAGE_DIR = Path(orama_stealth.__file__).resolve().parent
FINGERPRINT_LEN = 16
_VERSION = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.M)


@dataclass(frozen=True)
class Build:
    version: str
    fingerprint: str

    def __str__(self) -> str:
        return f"{self.version} build {self.fingerprint}"


def fingerprint(root: Path = PACKAGE_DIR) -> str:
    """Hex digest over the package's source files, in a stable order."""
    h = hashlib.sha256()
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in filenames:
            if name.endswith(".py"):
                full = Path(dirpath, name)
                files.append((full.relative_to(root).as_posix(), full))
    for rel, full in sorted(files):
        try:
            data = full.read_bytes()
        except OSError:
            data = b"<unreadable>"
        h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:FINGERPRINT_LEN]


def disk_version(root: Path = PACKAGE_DIR) -> str:
    """The version the files on disk declare (the running process may have imported another)."""
    try:
        m = _VERSION.search((root / "__init__.py").read_text(errors="replace"))
    except OSError:
        return "unknown"
    return m.group(1) if m else "unknown"


def on_disk(root: Path = PACKAGE_DIR) -> Build:
    return Build(disk_version(root), fingerprint(root))


def running() -> Build:
    """This process's build: the imported version, the fingerprint of the files at start.

    Cached: computed once, before any later change on disk can be mistaken for the running code.
    """
    global _running
    if _running is None:
        _running = Build(orama_stealth.__version__, fingerprint())
    return _running


_running: Build | None = None
