"""The in-process router tests run on both event loops."""

from __future__ import annotations

import pytest
from support.loops import LOOPS


@pytest.fixture(params=LOOPS)
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)
