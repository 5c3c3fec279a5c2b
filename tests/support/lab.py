"""Pytest fixtures for tests that need the lab node (a real systemd + sshd + Caddy + coturn).

    from support import lab as lab_fixtures
    lab_node = lab_fixtures.lab_node      # pytest finds fixtures by module attribute
    lab_fleet = lab_fixtures.lab_fleet    # lab_fleet(5) -> five fresh nodes

    @pytest.mark.lab
    def test_something(lab_node):
        st = lab_node.status()      # the same JSON as `orama-stealth lab status --json`
        lab_node.ssh("systemctl is-active caddy", check=True)

Each test gets a fresh node (a new overlay over the cached image, booted in about a second).
Nodes take an index from a machine-wide slot lock, so pytest runs of several people on one
machine never share a veth name, a /24 or a namespace. The image cache is shared: set
ORAMA_LAB_DIR to move it (default /var/tmp/orama-lab).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orama_stealth.lab import netns, nodeconf
from orama_stealth.lab.node import DEFAULT_STATE_DIR, LabNode

# Indexes below 10 are left to people running `orama-stealth lab up` by hand.
SLOTS = range(10, 90)
SLOT_LOCK_DIR = Path("/run/lock")


def skip_reason() -> str | None:
    """Why the lab cannot run here, or None. Only missing privileges/tools skip; anything
    else that goes wrong is a failure."""
    if os.geteuid() != 0:
        return "lab node needs root (network namespaces, mounts, systemd-nspawn)"
    for tool, pkg in (("systemd-nspawn", "systemd-container"), ("mmdebstrap", "mmdebstrap")):
        if shutil.which(tool) is None:
            return f"lab node needs {tool} (apt-get install {pkg})"
    return None


def _claim_slot() -> tuple[int, int]:
    """An index nobody else uses, held by an flock until released (or this process dies)."""
    SLOT_LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for index in SLOTS:
        fd = os.open(SLOT_LOCK_DIR / f"orama-lab-slot-{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        node = LabNode(f"olt{index}", index, _state_dir())
        # Holding the slot means no other test uses this node: whatever is left of it comes
        # from a test run that was killed before its cleanup.
        node.down(quiet=True)
        if netns.link_exists(node.spec.host_if) or netns.subnet_users(node.spec.subnet):
            os.close(fd)  # taken by something that does not use the slot locks
            continue
        return index, fd
    raise RuntimeError(f"no free lab slot in {SLOTS}: too many lab nodes running")


def _state_dir() -> Path:
    return Path(os.environ.get("ORAMA_LAB_DIR", str(DEFAULT_STATE_DIR)))


@pytest.fixture
def lab_nodes() -> Iterator[Callable[..., LabNode]]:
    """A factory: each call boots one more fresh node; all are stopped after the test."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    started: list[tuple[LabNode, int]] = []

    def make(
        base_domain: str = nodeconf.DEFAULT_BASE_DOMAIN,
        namespace: str = nodeconf.DEFAULT_NAMESPACE,
        acme: bool = False,
    ) -> LabNode:
        index, fd = _claim_slot()
        node = LabNode(
            f"olt{index}", index, _state_dir(), base_domain=base_domain, namespace=namespace,
            acme=acme,
        )
        started.append((node, fd))
        node.up()
        return node

    try:
        yield make
    finally:
        _down_all(started)


@pytest.fixture
def lab_fleet() -> Iterator[Callable[[int], list[LabNode]]]:
    """A factory: `lab_fleet(n)` boots n fresh nodes, each with its own slot and base
    domain `<name>.lab.orama.test`; all are stopped after the test."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    started: list[tuple[LabNode, int]] = []

    def make(count: int) -> list[LabNode]:
        nodes = []
        for _ in range(count):
            index, fd = _claim_slot()
            node = LabNode(f"olt{index}", index, _state_dir(),
                           base_domain=f"olt{index}.{nodeconf.DEFAULT_BASE_DOMAIN}")
            started.append((node, fd))
            nodes.append(node)
        for node in nodes:
            node.up()  # one at a time: see orama_stealth.lab.cli.UP_PARALLEL
        return nodes

    try:
        yield make
    finally:
        _down_all(started)


def _down_all(started: list[tuple[LabNode, int]]) -> None:
    errors: list[BaseException] = []
    for node, fd in reversed(started):
        try:
            node.down()
        except Exception as e:
            errors.append(e)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    if errors:
        raise errors[0]


@pytest.fixture
def lab_node(lab_nodes: Callable[..., LabNode]) -> LabNode:
    """One fresh node in the before-cutover state; stopped after the test."""
    return lab_nodes()
