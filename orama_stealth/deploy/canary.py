"""The staged-rollout rule: no fleet host is cut over before the canary has soaked.

Checked live every run, never from an earlier run: the canary's state file is read over SSH
and the canary is probed through its :443. pyinfra runs the fleet's hosts at once, as
greenlets sharing one process and the canary's one SSH connection, so the canary is read
once per run, under a lock, and every host of the run decides on that one reading.
"""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import dataclass
from typing import Any

import gevent.lock

from orama_stealth.deploy import layout
from orama_stealth.deploy.settings import NodeSettings, SettingsError, settings_from_data
from orama_stealth.deploy.verify import cutover_probes

CANARY_GROUP = "canary"
READ_TIMEOUT = 30


class CanaryRefusal(RuntimeError):
    """This host may not be cut over yet; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class CanaryStatus:
    name: str
    state: str
    since: float | None


@dataclass
class CanaryReading:
    """What one run knows about its canary: the state file, and (read only when a host gets
    that far) the failed probes."""

    status: CanaryStatus
    probe_failures: list[str] | None = None


_lock = gevent.lock.Semaphore()
_readings: weakref.WeakKeyDictionary[Any, CanaryReading] = weakref.WeakKeyDictionary()


def parse_state(name: str, text: str) -> CanaryStatus:
    if not text:
        return CanaryStatus(name, "never cut over", None)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return CanaryStatus(name, f"unreadable {layout.STATE_FILE}", None)
    if not isinstance(doc, dict):
        return CanaryStatus(name, f"unreadable {layout.STATE_FILE}", None)
    since = doc.get("since")
    return CanaryStatus(name, str(doc.get("state", "unknown")),
                        float(since) if isinstance(since, int | float) else None)


def read_canary_state(canary: Any) -> CanaryStatus:
    """Read the canary's state file over its own SSH connection, bounded in time. Call it
    under `_lock` only: two greenlets on one paramiko connection hang it."""
    try:
        if not canary.connected:
            canary.connect(reason="canary check", raise_exceptions=True)
        ok, output = canary.run_shell_command(f"cat {layout.STATE_FILE} 2>/dev/null || true",
                                              _timeout=READ_TIMEOUT)
    except TimeoutError:
        return CanaryStatus(canary.name, f"unreadable: no answer within {READ_TIMEOUT}s", None)
    except Exception as exc:  # any failure to reach it means "not proven"
        return CanaryStatus(canary.name, f"unreachable: {exc}", None)
    return parse_state(canary.name, output.stdout.strip() if ok else "")


def soak_verdict(status: CanaryStatus, soak: float, now: float) -> str | None:
    """None when the canary allows the fleet; else the reason it does not."""
    if status.state != "cutover" or status.since is None:
        return f"canary {status.name} is not cut over (state: {status.state})"
    soaked = now - status.since
    if soaked < soak:
        return (f"canary {status.name} cut over {soaked:.0f}s ago, needs canary_soak={soak:.0f}s "
                f"(wait {soak - soaked:.0f}s more, or override with --data canary_soak=0)")
    return None


def _probe_failures(canary: Any) -> list[str]:
    try:
        cs = settings_from_data(canary.name, canary.data)
    except SettingsError as exc:
        return [str(exc)]
    return [f"{o.probe}: {o.detail}" for o in cutover_probes(cs) if not o.ok]


def check_canary(state: Any, host: Any, s: NodeSettings) -> None:
    """Raise CanaryRefusal unless `host` is the canary, there is none, or it has soaked."""
    group = state.inventory.get_group(CANARY_GROUP, default=[])
    if not group or host in group:
        return
    canary = group[0]
    with _lock:
        reading = _readings.get(state)
        if reading is None:
            reading = _readings[state] = CanaryReading(read_canary_state(canary))
    verdict = soak_verdict(reading.status, s.canary_soak, time.time())
    if verdict is not None:
        raise CanaryRefusal(f"refusing to cut over {host.name}: {verdict}")
    with _lock:
        if reading.probe_failures is None:
            reading.probe_failures = _probe_failures(canary)
    if reading.probe_failures:
        raise CanaryRefusal(f"refusing to cut over {host.name}: canary {canary.name} fails its "
                            "probes now: " + "; ".join(reading.probe_failures))
