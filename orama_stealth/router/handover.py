"""What a supervisor passes to its next image across `os.execv` when it upgrades itself.

The same PID re-executes itself with the new code; everything that must survive is either a
descriptor (inherited across exec once O_CLOEXEC is cleared) or a number, described by one JSON
document in an environment variable that the new image removes as it reads it:

- the listening sockets, per listener (one per worker when the router bound them, or the one
  socket systemd passed), with the listener's definition as the running config had it;
- the metrics server's listening socket;
- every worker still alive (pid, index, control channel), with the memfd of the stats region
  (and of the admission table) its generation publishes into; workers of an older generation
  that are still draining travel the same way, marked `draining`;
- the counters (retired totals, restarts, reloads, upgrades) and the status generation.

The new image adopts all of it (`Supervisor.adopt`): the workers stay its children, so it reaps
them, and their counters keep adding up.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from orama_stealth.router.config import Backend, Listener

ENV = "ORAMA_SNI_ROUTER_HANDOVER"
FORMAT = 1


class HandoverError(Exception):
    pass


@dataclass
class HandedListener:
    name: str
    how: str  # bound | inherited
    fds: list[int]
    definition: dict[str, Any]


@dataclass
class HandedRegion:
    stats_fd: int
    workers: int
    table_fd: int | None = None


@dataclass
class HandedWorker:
    pid: int
    index: int
    channel_fd: int | None
    region: int  # index into State.regions
    draining: bool = False


@dataclass
class State:
    from_build: str
    nworkers: int
    workers_setting: int
    metrics_listen: list[Any] | None
    metrics_fd: int | None
    generation: int
    listeners: list[HandedListener] = field(default_factory=list)
    regions: list[HandedRegion] = field(default_factory=list)
    workers: list[HandedWorker] = field(default_factory=list)
    counters: dict[str, Any] = field(default_factory=dict)
    pending_reload: bool = False
    format: int = FORMAT

    def fds(self) -> list[int]:
        """Every descriptor the new image needs: they must survive the exec."""
        out = [fd for li in self.listeners for fd in li.fds]
        out += [r.stats_fd for r in self.regions]
        out += [r.table_fd for r in self.regions if r.table_fd is not None]
        out += [w.channel_fd for w in self.workers if w.channel_fd is not None]
        if self.metrics_fd is not None:
            out.append(self.metrics_fd)
        return out

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def decode(text: str) -> State:
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise HandoverError(f"unknown handover format {doc.get('format')!r}")
        doc["listeners"] = [HandedListener(**x) for x in doc.get("listeners", [])]
        doc["regions"] = [HandedRegion(**x) for x in doc.get("regions", [])]
        doc["workers"] = [HandedWorker(**x) for x in doc.get("workers", [])]
        return State(**doc)
    except (ValueError, TypeError, AttributeError) as e:
        raise HandoverError(f"{ENV}: unreadable handover state: {e}") from None


def take() -> State | None:
    """The handover left by the previous image of this process, removed from the environment
    (so no child and no later exec sees it again); None on an ordinary start."""
    text = os.environ.pop(ENV, None)
    return decode(text) if text else None


def listener_definition(li: Listener) -> dict[str, Any]:
    return asdict(li)


def listener_from(definition: dict[str, Any]) -> Listener:
    d = dict(definition)
    backend = d.pop("backend", None)
    try:
        return Listener(**d, backend=Backend(**backend) if backend is not None else None)
    except TypeError as e:
        raise HandoverError(f"listener definition {definition!r}: {e}") from None
