"""Build and pick the wheels a node installs the router from (nodes reach no package index).

The project wheel is rebuilt only when the source changes: a fingerprint over the package source,
the project metadata and the runtime wheels names it, and the node records the fingerprint it
installed, so an unchanged re-run uploads and installs nothing.

pyinfra asks for the wheel set from every host at once (greenlets in one process), and other
runs may build beside this one: the set is computed once per process under a lock, and a
build goes to a directory of its own that is renamed into place, so no build ever sees
another's half-written files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gevent.lock

RUNTIME_WHEELS = ("pyyaml", "uvloop", "pip")
BUILD_TIMEOUT = 300
# Where built project wheels are cached (default <checkout>/build/deploy).
CACHE_ENV = "ORAMA_STEALTH_WHEEL_CACHE"


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


_lock = gevent.lock.Semaphore()
_sets: dict[tuple[Path, Path | None], WheelSet | WheelError] = {}


def wheel_set(root: Path, release: Path | None = None) -> WheelSet:
    """Runtime wheels from build/wheelhouse and the project wheel: `release` (an exact wheel
    the operator ships) or one built from this checkout, cached by source fingerprint.
    Computed once per process: every host of a run gets the same set."""
    key = (root, release)
    with _lock:
        if key not in _sets:
            try:
                _sets[key] = _wheel_set(root, release)
            except WheelError as exc:
                _sets[key] = exc  # every host reports this one failure, nobody builds again
        found = _sets[key]
    if isinstance(found, WheelError):
        raise found
    return found


def cache_dir(root: Path) -> Path:
    return Path(os.environ.get(CACHE_ENV) or root / "build" / "deploy")


def _build(root: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            proc = subprocess.run(
                # Offline: the build backend comes from this environment, never from an index.
                [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "--no-index", "--disable-pip-version-check", "-q", "-w", str(tmp), str(root)],
                capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False,
            )
        except subprocess.TimeoutExpired:
            raise WheelError(f"pip wheel {root} did not finish within {BUILD_TIMEOUT}s") from None
        if proc.returncode != 0:
            raise WheelError(f"pip wheel {root} failed: {proc.stderr.strip()[-2000:]}")
        try:
            tmp.rename(out)
        except OSError:
            if not sorted(out.glob("orama_stealth-*.whl")):
                raise  # not another build's finished result: a real error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _wheel_set(root: Path, release: Path | None) -> WheelSet:
    runtime = runtime_wheels(root / "build" / "wheelhouse")
    if release is not None:
        if not release.is_file() or not release.name.startswith("orama_stealth-"):
            raise WheelError(f"router_wheel {release}: expected an orama_stealth-*.whl file")
        digest = hashlib.sha256(release.read_bytes())
        for wheel in runtime:
            digest.update(wheel.name.encode() + b"\0")
        return WheelSet(fingerprint=digest.hexdigest()[:16], project=release, runtime=runtime)
    fp = fingerprint(root, runtime)
    out = cache_dir(root) / fp
    if not sorted(out.glob("orama_stealth-*.whl")):
        _build(root, out)
    built = sorted(out.glob("orama_stealth-*.whl"))
    return WheelSet(fingerprint=fp, project=built[-1], runtime=runtime)
