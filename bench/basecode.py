"""Another commit's tree in a directory, for the `base` target: `git archive | tar -x`, no
checkout of this working tree is touched."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The router before it ran on asyncio (its own epoll loop), main's last commit before the
# layout change.
DEFAULT_BASE = "d00cba7"


def extract(commit: str, dest: Path) -> str:
    """Write `commit`'s tree to `dest`; return the full commit id."""
    full = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{commit}^{{commit}}"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout.strip()
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(
        ["git", "-C", str(ROOT), "archive", "--format=tar", full], stdout=subprocess.PIPE
    )
    try:
        subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True,
                       timeout=60)
    finally:
        if archive.stdout is not None:
            archive.stdout.close()
        if archive.wait(timeout=60) != 0:
            raise RuntimeError(f"git archive {full} failed")
    return full
