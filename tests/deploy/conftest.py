"""Fixtures of the deploy tests: lab nodes, and one router wheel per test module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support import lab as lab_fixtures
from support.deploylab import Lab, build_wheel

lab_nodes = lab_fixtures.lab_nodes  # lab_node depends on it
lab_node = lab_fixtures.lab_node
lab_fleet = lab_fixtures.lab_fleet


@pytest.fixture(scope="module")
def release_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One wheel for the whole module, so runs compare like with like even while the
    checkout changes underneath (the deploy's own build is keyed by the source)."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture
def lab(lab_node: Any, tmp_path: Path, release_wheel: Path) -> Lab:
    status = lab_node.status()
    path = tmp_path / "lab-status.json"
    path.write_text(json.dumps(status))
    return Lab(lab_node, status, path, release_wheel)
