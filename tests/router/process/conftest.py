"""Fixtures shared by the router's acceptance tests. Every test here runs the router once on
each event loop it supports (ORAMA_LOOP, inherited by the router process)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.loops import LOOPS
from support.tls_backends import Backend, Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA and certificates for the backends' names, one per test module."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module", params=LOOPS, autouse=True)
def event_loop_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """Module-scoped, so a module's shared router (its `rt` fixture asks for this one) starts
    once per loop and the module's tests run grouped by loop."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORAMA_LOOP", str(request.param))
        yield str(request.param)


@pytest.fixture(scope="module")
def turn(pki: Pki) -> Iterator[Backend]:
    """A TLS backend standing for the TURN server (cdn routes), one per test module."""
    with Backend("turn", pki) as b:
        yield b


@pytest.fixture(scope="module")
def caddy(pki: Pki) -> Iterator[Backend]:
    """A TLS backend standing for Caddy (the fallback), one per test module."""
    with Backend("caddy", pki) as b:
        yield b
