"""Test hook: stop a cutover between two steps."""

from __future__ import annotations

import os
import time

from pyinfra.api.operation import operation
from pyinfra.context import host

from orama_stealth.deploy.ops.common import Commands, executing, failure, settings

PAUSE_LIMIT = 600.0


@operation()
def pause_point(step: str) -> Commands:
    """With --data pause_after=<step>, stop here so an interrupted cutover can be tested: the
    run waits (bounded) until killed, or until the file `pause_resume_file` (on this machine)
    appears, so a test can also change the node mid-run and let the cutover continue."""
    s = settings()
    if not executing() or s.pause_after != step:
        return
    resume = host.data.get("pause_resume_file")
    print(f"orama-stealth: paused after step={step}", flush=True)
    deadline = time.monotonic() + PAUSE_LIMIT
    while time.monotonic() < deadline:
        if resume and os.path.exists(str(resume)):
            print(f"orama-stealth: resumed after step={step}", flush=True)
            return
        time.sleep(0.2)
    yield failure(f"paused after {step} for {PAUSE_LIMIT:.0f}s and nobody resumed or stopped it")

