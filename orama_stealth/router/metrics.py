"""Counters: plain int increments in each worker, published to the supervisor in batches.

The data path only does `stats.x += n`; once a second (and on exit) a worker serialises its
counters into its own slot of a shared-memory region, under a sequence number so the supervisor
never reads a half-written slot. The supervisor sums the slots (plus whatever workers that died
had already published, so counters never go backwards) and renders Prometheus text.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections import Counter

PREFIX = "orama_sni_router"
SLOT_SIZE = 1 << 16
_SEQ_LEN = struct.Struct("=QI")


class Stats:
    """One worker's counters. Cheap to bump; `snapshot()` is for publishing, not the data path."""

    __slots__ = (
        "accept_failures",
        "active",
        "bytes_down",
        "bytes_up",
        "callback_errors",
        "conns",
        "dial_failures",
        "half_close_closed",
        "hello_evicted",
        "hello_failures",
        "idle_closed",
        "refused",
        "splice_refused",
        "splice_switches",
    )

    def __init__(self) -> None:
        self.active = 0
        self.bytes_up = 0  # client -> backend
        self.bytes_down = 0  # backend -> client
        self.conns: Counter[str] = Counter()  # by backend name
        self.dial_failures: Counter[str] = Counter()  # by backend name
        self.hello_failures: Counter[str] = Counter()  # by reason
        self.refused: Counter[str] = Counter()  # by limit: global | per_ip
        self.idle_closed = 0
        self.half_close_closed = 0
        self.hello_evicted = 0  # closed before their hello completed, to admit newer ones
        self.accept_failures: Counter[str] = Counter()  # by errno name: EMFILE, ENFILE, ...
        self.splice_switches = 0
        self.splice_refused = 0
        self.callback_errors = 0

    def snapshot(self) -> dict[str, object]:
        return {
            "active": self.active,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "conns": dict(self.conns),
            "dial_failures": dict(self.dial_failures),
            "hello_failures": dict(self.hello_failures),
            "refused": dict(self.refused),
            "idle_closed": self.idle_closed,
            "half_close_closed": self.half_close_closed,
            "hello_evicted": self.hello_evicted,
            "accept_failures": dict(self.accept_failures),
            "splice_switches": self.splice_switches,
            "splice_refused": self.splice_refused,
            "callback_errors": self.callback_errors,
        }


class StatsRegion:
    """One fixed-size slot per worker in a shared mapping created before the fork."""

    def __init__(self, workers: int, fd: int | None = None) -> None:
        """A new region, or (`fd`) the memfd of an existing one, handed over across an exec."""
        self.workers = workers
        size = SLOT_SIZE * workers
        if fd is None:
            fd = os.memfd_create("orama-sni-stats", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd = fd
        self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)

    def publish(self, index: int, snap: dict[str, object]) -> None:
        data = json.dumps(snap, separators=(",", ":")).encode()
        limit = SLOT_SIZE - _SEQ_LEN.size
        if len(data) > limit:
            # Too many distinct labels for one slot: keep the totals, drop the breakdowns.
            slim = {k: v for k, v in snap.items() if not isinstance(v, dict)}
            data = json.dumps(slim, separators=(",", ":")).encode()
        base = index * SLOT_SIZE
        seq = _SEQ_LEN.unpack_from(self.mm, base)[0]
        _SEQ_LEN.pack_into(self.mm, base, seq + 1, 0)  # odd: being written
        start = base + _SEQ_LEN.size
        self.mm[start : start + len(data)] = data
        _SEQ_LEN.pack_into(self.mm, base, seq + 2, len(data))

    def read(self, index: int) -> dict[str, object] | None:
        base = index * SLOT_SIZE
        for _ in range(100):
            seq, length = _SEQ_LEN.unpack_from(self.mm, base)
            if seq == 0:
                return None
            if seq & 1:
                continue
            start = base + _SEQ_LEN.size
            data = bytes(self.mm[start : start + length])
            if _SEQ_LEN.unpack_from(self.mm, base)[0] == seq:
                try:
                    out = json.loads(data)
                except ValueError:
                    return None
                return out if isinstance(out, dict) else None
        return None

    def clear(self, index: int) -> None:
        base = index * SLOT_SIZE
        self.mm[base : base + SLOT_SIZE] = bytes(SLOT_SIZE)


def merge(snaps: list[dict[str, object]]) -> dict[str, object]:
    """Sum snapshots field by field (dicts by key)."""
    out: dict[str, object] = {}
    for snap in snaps:
        for key, value in snap.items():
            if isinstance(value, dict):
                acc = out.setdefault(key, {})
                assert isinstance(acc, dict)
                for k, v in value.items():
                    acc[k] = acc.get(k, 0) + int(v)
            elif isinstance(value, int):
                prev = out.get(key, 0)
                out[key] = (prev if isinstance(prev, int) else 0) + value
    return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _counter_map(snap: dict[str, object], key: str) -> dict[str, int]:
    value = snap.get(key)
    return {str(k): int(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _int(snap: dict[str, object], key: str) -> int:
    value = snap.get(key)
    return value if isinstance(value, int) else 0


def render(
    snap: dict[str, object], gauges: dict[str, int], info: dict[str, str] | None = None
) -> str:
    """Prometheus text exposition format 0.0.4. `info`: the build_info labels."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> str:
        full = f"{PREFIX}_{name}"
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} {kind}")
        return full

    def labelled(name: str, help_text: str, label: str, values: dict[str, int]) -> None:
        full = family(name, "counter", help_text)
        for k in sorted(values):
            lines.append(f'{full}{{{label}="{_label(k)}"}} {values[k]}')

    labelled(
        "connections_total", "Connections routed, by backend name.", "backend",
        _counter_map(snap, "conns"),
    )
    labelled(
        "dial_failures_total", "Backend dials that failed, by backend name.", "backend",
        _counter_map(snap, "dial_failures"),
    )
    labelled(
        "hello_failures_total", "ClientHello peeks that failed, by reason.", "reason",
        _counter_map(snap, "hello_failures"),
    )
    refused = {"global": 0, "per_ip": 0}
    refused.update(_counter_map(snap, "refused"))
    labelled(
        "limit_refusals_total", "Connections refused by a connection limit.", "limit", refused
    )
    full = family(
        "hello_evicted_total", "counter",
        "Connections closed before completing their ClientHello to make room for newer ones "
        "at the connection cap.",
    )
    lines.append(f"{full} {_int(snap, 'hello_evicted')}")
    labelled(
        "accept_failures_total",
        "accept(2) failures for want of resources (descriptors, memory), by errno.", "errno",
        _counter_map(snap, "accept_failures"),
    )
    full = family("bytes_total", "counter", "Bytes relayed, by direction.")
    lines.append(f'{full}{{direction="client_to_backend"}} {_int(snap, "bytes_up")}')
    lines.append(f'{full}{{direction="backend_to_client"}} {_int(snap, "bytes_down")}')
    full = family("idle_closed_total", "counter", "Connections closed by idle_timeout.")
    lines.append(f"{full} {_int(snap, 'idle_closed')}")
    full = family(
        "half_close_closed_total", "counter",
        "Connections closed because one direction finished and the other did not within "
        "half_close_timeout.",
    )
    lines.append(f"{full} {_int(snap, 'half_close_closed')}")
    full = family("splice_switches_total", "counter", "Directions switched to splice(2).")
    lines.append(f"{full} {_int(snap, 'splice_switches')}")
    full = family(
        "splice_refused_total", "counter",
        "Bulk directions kept copying because the pipe budget allowed only a small pipe.",
    )
    lines.append(f"{full} {_int(snap, 'splice_refused')}")
    full = family(
        "callback_errors_total", "counter",
        "Unexpected errors inside a connection callback (each is logged); should stay 0.",
    )
    lines.append(f"{full} {_int(snap, 'callback_errors')}")
    full = family("active_connections", "gauge", "Connections open now (all workers).")
    lines.append(f"{full} {_int(snap, 'active')}")
    for name, value in sorted(gauges.items()):
        kind = "counter" if name.endswith("_total") else "gauge"
        full = family(name, kind, _GAUGE_HELP.get(name, name.replace("_", " ") + "."))
        lines.append(f"{full} {value}")
    if info is not None:
        full = family(
            "build_info", "gauge", "The running build: package version and source fingerprint."
        )
        labels = ",".join(f'{k}="{_label(v)}"' for k, v in info.items())
        lines.append(f"{full}{{{labels}}} 1")
    return "\n".join(lines) + "\n"


_GAUGE_HELP = {
    "tracked_client_ips": "Client addresses with live connections in the per-address table.",
    "workers": "Worker processes running.",
    "worker_restarts_total": "Workers restarted after dying.",
    "reloads_total": "Configuration reloads applied.",
    "reload_failures_total": "Configuration reloads rejected (old table kept).",
    "upgrades_total": "Upgrades to a new build applied on reload (same PID, re-executed).",
    "upgrade_failures_total": "Upgrades refused (the new build failed its check; old code kept).",
    "draining_workers": "Workers of an older build still finishing their connections.",
}
