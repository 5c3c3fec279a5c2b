"""Build and pick the wheels a node installs the router from (nodes reach no package index).

The project wheel is rebuilt only when the source changes: a fingerprint over the package source,
the project metadata and the runtime wheels names it, and the node records the fingerprint it
installed, so an unchanged re-run uploads and installs nothing.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

RUNTIME_WHEELS = ("pyyaml", "pip")


class WheelError(RuntimeError):
    """A wheel the node needs is missing here; the message says how to get it."""


@dataclass(frozen=True, slots=True)
class WheelSet:
    fingerprint: str
    project: Path
    runtime: tuple[Path, ...]

    @property
    def pip(self) -> Path:
        return next(w for w in self.runtime if w.name.startswith("pip-"))

    @property
    def all(self) -> tuple[Path, ...]:
        return (self.project, *self.runtime)


def runtime_wheels(wheelhouse: Path) -> tuple[Path, ...]:
    found: list[Path] = []
    for name in RUNTIME_WHEELS:
        matches = sorted(wheelhouse.glob(f"{name}-*.whl"))
        if name != "pip":
            matches = [m for m in matches if "cp311" in m.name and "x86_64" in m.name]
        if not matches:
            raise WheelError(
                f"{wheelhouse}: no {name} wheel for cp311 x86_64; run scripts/bootstrap.sh, "
                "which downloads the nodes' runtime wheels into build/wheelhouse/"
            )
        found.append(matches[-1])
    return tuple(found)


def fingerprint(root: Path, runtime: tuple[Path, ...]) -> str:
    digest = hashlib.sha256()
    files = [*sorted((root / "orama_stealth").rglob("*.py")), root / "pyproject.toml"]
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    for wheel in runtime:
        digest.update(wheel.name.encode() + b"\0")
    return digest.hexdigest()[:16]


def wheel_set(root: Path, release: Path | None = None) -> WheelSet:
    """Runtime wheels from build/wheelhouse and the project wheel: `release` (an exact wheel
    the operator ships) or one built from this checkout, cached by source fingerprint."""
    runtime = runtime_wheels(root / "build" / "wheelhouse")
    if release is not None:
        if not release.is_file() or not release.name.startswith("orama_stealth-"):
            raise WheelError(f"router_wheel {release}: expected an orama_stealth-*.whl file")
        digest = hashlib.sha256(release.read_bytes())
        for wheel in runtime:
            digest.update(wheel.name.encode() + b"\0")
        return WheelSet(fingerprint=digest.hexdigest()[:16], project=release, runtime=runtime)
    fp = fingerprint(root, runtime)
    out = root / "build" / "deploy" / fp
    built = sorted(out.glob("orama_stealth-*.whl"))
    if not built:
        tmp = out.with_name(fp + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            # Offline: the build backend comes from this environment, never from an index.
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--no-index", "--disable-pip-version-check", "-q", "-w", str(tmp), str(root)],
            capture_output=True, text=True, timeout=300, check=False,
        )
        if proc.returncode != 0:
            raise WheelError(f"pip wheel {root} failed: {proc.stderr.strip()[-2000:]}")
        tmp.rename(out)
        built = sorted(out.glob("orama_stealth-*.whl"))
    return WheelSet(fingerprint=fp, project=built[-1], runtime=runtime)
