"""The lab node's root filesystem: Debian 12 built once with mmdebstrap, then cached.

The cache directory is named after a hash of the recipe (packages, hooks, suite, apt sources),
so changing the recipe builds a new tree beside the old one instead of swapping the lower layer
out from under a node that is still running on it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Bump when the recipe changes in a way the package list does not show (hooks, layout).
RECIPE_VERSION = 1
SUITE = "bookworm"
PACKAGES: tuple[str, ...] = (
    "systemd", "systemd-sysv", "dbus", "openssh-server",
    "python3", "python3-venv",
    "caddy", "coturn",
    "iproute2", "nftables", "ca-certificates", "procps", "curl", "openssl", "sudo", "less",
)
# Only things every node shares go into the image; per-node files (keys, certificates,
# hostname, configs) are written into each boot's overlay.
CUSTOMIZE_HOOKS: tuple[str, ...] = (
    'chroot "$1" systemctl enable ssh.service',
    # The node has no route to a mirror: timers that fetch from the network can only fail.
    'chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer',
)
DEFAULT_SOURCES = (
    Path("/etc/apt/sources.list.d/debian.sources"),
    Path("/etc/apt/sources.list"),
)
READY_MARK = ".json"


class ImageError(RuntimeError):
    pass


@dataclass(frozen=True)
class Image:
    rootfs: Path
    recipe_hash: str
    info: dict[str, object]


def default_sources() -> Path:
    for p in DEFAULT_SOURCES:
        if p.is_file() and p.stat().st_size > 0:
            return p
    raise ImageError(
        "no apt sources found: expected one of "
        + ", ".join(str(p) for p in DEFAULT_SOURCES)
        + " (or pass --apt-sources FILE)"
    )


def recipe(sources: Path) -> dict[str, object]:
    try:
        sources_text = sources.read_text(encoding="utf-8")
    except OSError as e:
        raise ImageError(f"{sources}: cannot read apt sources: {e.strerror}") from e
    return {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "packages": sorted(PACKAGES),
        "hooks": list(CUSTOMIZE_HOOKS),
        "sources": sources_text,
    }


def recipe_hash(rec: dict[str, object]) -> str:
    blob = json.dumps(rec, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An flock held for the block; released by the kernel even if this process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def cached(cache_dir: Path, h: str) -> Image | None:
    rootfs = cache_dir / f"rootfs-{h}"
    mark = cache_dir / f"rootfs-{h}{READY_MARK}"
    if not (rootfs.is_dir() and mark.is_file()):
        return None
    try:
        info = json.loads(mark.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return Image(rootfs, h, info if isinstance(info, dict) else {})


def ensure_image(
    cache_dir: Path,
    sources: Path | None = None,
    *,
    force: bool = False,
    log: Callable[[str], None] = lambda _line: None,
) -> Image:
    """Return the cached rootfs for the current recipe, building it first if needed.

    Concurrent callers (two nodes starting at once) serialise on a lock; the second finds
    the first one's tree and returns at once.
    """
    src = sources or default_sources()
    rec = recipe(src)
    h = recipe_hash(rec)
    with file_lock(cache_dir / "build.lock"):
        img = cached(cache_dir, h)
        if img is not None and not force:
            return img
        return _build(cache_dir, src, rec, h, log)


def _build(
    cache_dir: Path, sources: Path, rec: dict[str, object], h: str,
    log: Callable[[str], None],
) -> Image:
    if shutil.which("mmdebstrap") is None:
        raise ImageError("mmdebstrap not found: apt-get install mmdebstrap")
    rootfs = cache_dir / f"rootfs-{h}"
    mark = cache_dir / f"rootfs-{h}{READY_MARK}"
    tmp = cache_dir / f"rootfs-{h}.tmp"
    build_log = cache_dir / f"rootfs-{h}.build.log"
    remove_tree(tmp)
    mark.unlink(missing_ok=True)
    argv = [
        "mmdebstrap", "--variant=apt", "--mode=root",
        # Snapshot mirrors serve Release files whose Valid-Until has long passed.
        '--aptopt=Acquire::Check-Valid-Until "false"',
        '--aptopt=Acquire::Check-Date "false"',
        "--include=" + ",".join(PACKAGES),
        *(f"--customize-hook={hook}" for hook in CUSTOMIZE_HOOKS),
        SUITE, str(tmp), str(sources),
    ]
    log(f"event=lab_build_start recipe={h} rootfs={rootfs} log={build_log}")
    t0 = time.monotonic()
    with open(build_log, "wb") as out:
        # stdin from /dev/null: mmdebstrap reads extra sources from a non-terminal stdin.
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        remove_tree(tmp)
        tail = build_log.read_text(errors="replace")[-3000:]
        raise ImageError(f"mmdebstrap failed with exit {proc.returncode}; {build_log}:\n{tail}")
    seconds = time.monotonic() - t0
    if rootfs.exists():
        # Only reached with --force, which the CLI refuses while a node runs on this tree.
        remove_tree(rootfs)
    tmp.rename(rootfs)
    size = _du(rootfs)
    info: dict[str, object] = {
        "recipe_hash": h,
        "recipe_version": RECIPE_VERSION,
        "packages": rec["packages"],
        "build_seconds": round(seconds, 1),
        "size_bytes": size,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    mark.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log(f"event=lab_build_done recipe={h} seconds={seconds:.1f} size_mb={size // 1_000_000}")
    return Image(rootfs, h, info)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.absolute()).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            # Field 5 is the mount point; spaces in it are written as \040.
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix) or point == prefix[:-1]:
                found.append(point)
    return found


def remove_tree(path: Path) -> None:
    """Delete a half-built tree. A build killed mid-way can leave /proc, /sys or /dev mounted
    inside it: unmount them first, and never recurse into a mount (that would delete the
    host's device nodes)."""
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", point], capture_output=True, stdin=subprocess.DEVNULL)
    left = _mounts_under(path)
    if left:
        raise ImageError(f"{path}: still mounted after umount: {', '.join(left)}; unmount by hand")
    shutil.rmtree(path, ignore_errors=True)


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            total += st.st_blocks * 512
    return total


def remove_images(cache_dir: Path, keep: set[Path] | None = None) -> list[Path]:
    """Delete cached trees (except `keep`); return what was removed."""
    removed: list[Path] = []
    if not cache_dir.is_dir():
        return removed
    with file_lock(cache_dir / "build.lock"):
        for p in sorted(cache_dir.glob("rootfs-*")):
            if p.is_dir() and (keep is None or p not in keep):
                remove_tree(p)
                removed.append(p)
            elif p.is_file() and (keep is None or p.with_suffix("") not in keep):
                p.unlink(missing_ok=True)
    return removed
