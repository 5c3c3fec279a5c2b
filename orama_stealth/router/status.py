"""The outcome of the last reload, as a small JSON file in the runtime directory.

The supervisor writes it atomically (a temporary file renamed over it) at start and after every
SIGHUP, with a generation counter that only grows (it survives an upgrade: `handover`); the
`reload` command sends SIGHUP and waits for a generation newer than the one it saw before, so
its exit code says whether this reload (and the upgrade, if any) took effect.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

FILE = "status.json"


@dataclass(frozen=True)
class Status:
    generation: int
    ok: bool
    error: str | None
    version: str
    build: str
    pid: int


def runtime_dir(explicit: str | None = None) -> Path | None:
    """--runtime-dir, else systemd's $RUNTIME_DIRECTORY (the first one when several)."""
    text = explicit or os.environ.get("RUNTIME_DIRECTORY", "").split(":", 1)[0]
    return Path(text) if text else None


def write(directory: Path, status: Status) -> None:
    path = directory / FILE
    tmp = directory / f".{FILE}.{os.getpid()}"
    data = json.dumps(asdict(status), separators=(",", ":")).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read(directory: Path) -> Status | None:
    try:
        doc = json.loads((directory / FILE).read_text())
        return Status(
            generation=int(doc["generation"]), ok=bool(doc["ok"]),
            error=None if doc.get("error") is None else str(doc["error"]),
            version=str(doc.get("version", "")), build=str(doc.get("build", "")),
            pid=int(doc.get("pid", 0)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
