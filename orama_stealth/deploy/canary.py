"""The staged-rollout rule: no fleet host is cut over before the canary has soaked.

Checked live every time, never from memory: the canary is probed through its :443 now, and its
state file is read over SSH now.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from orama_stealth.deploy import layout
from orama_stealth.deploy.settings import NodeSettings, settings_from_data
from orama_stealth.deploy.verify import cutover_probes

CANARY_GROUP = "canary"


class CanaryRefusal(RuntimeError):
    """This host may not be cut over yet; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class CanaryStatus:
    name: str
    state: str
    since: float | None


def read_canary_state(canary: Any) -> CanaryStatus:
    """Read the canary's state file over its own SSH connection."""
    if not canary.connected:
        canary.connect(reason="canary check", raise_exceptions=True)
    ok, output = canary.run_shell_command(f"cat {layout.STATE_FILE} 2>/dev/null || true")
    text = output.stdout.strip() if ok else ""
    if not text:
        return CanaryStatus(canary.name, "never cut over", None)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return CanaryStatus(canary.name, f"unreadable {layout.STATE_FILE}", None)
    since = doc.get("since")
    return CanaryStatus(canary.name, str(doc.get("state", "unknown")),
                        float(since) if isinstance(since, int | float) else None)


def soak_verdict(status: CanaryStatus, soak: float, now: float) -> str | None:
    """None when the canary allows the fleet; else the reason it does not."""
    if status.state != "cutover" or status.since is None:
        return f"canary {status.name} is not cut over (state: {status.state})"
    soaked = now - status.since
    if soaked < soak:
        return (f"canary {status.name} cut over {soaked:.0f}s ago, needs canary_soak={soak:.0f}s "
                f"(wait {soak - soaked:.0f}s more, or override with --data canary_soak=0)")
    return None


def check_canary(inventory: Any, host: Any, s: NodeSettings) -> None:
    """Raise CanaryRefusal unless `host` is the canary, there is none, or it has soaked."""
    group = inventory.get_group(CANARY_GROUP, default=[])
    if not group or host in group:
        return
    canary = group[0]
    cs = settings_from_data(canary.name, canary.data)
    status = read_canary_state(canary)
    verdict = soak_verdict(status, s.canary_soak, time.time())
    if verdict is not None:
        raise CanaryRefusal(f"refusing to cut over {host.name}: {verdict}")
    failed = [o for o in cutover_probes(cs) if not o.ok]
    if failed:
        raise CanaryRefusal(
            f"refusing to cut over {host.name}: canary {canary.name} fails its probes now: "
            + "; ".join(f"{o.probe}: {o.detail}" for o in failed)
        )
