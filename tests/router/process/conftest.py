"""Fixtures shared by the router's acceptance tests."""

from __future__ import annotations

import pytest
from support.tls_backends import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA and certificates for the backends' names, one per test module."""
    return make_pki(tmp_path_factory.mktemp("pki"))
