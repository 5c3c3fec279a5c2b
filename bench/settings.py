"""Durations and sizes of a full run and of the smoke run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Settings:
    repetitions: int
    w1_connections: int  # wrk concurrency for new connections
    w1_seconds: float
    w1_serial_count: int  # one-at-a-time connections for the latency figures
    w2_connections: int
    w2_seconds: float
    warmup_seconds: float  # unmeasured wrk run before each measured one (0 = none)
    big_size: int  # bytes of the bulk file
    w3_parallel: int
    idle_count: int
    idle_clients: int  # client processes sharing the idle connections
    route_sizes: tuple[int, ...]
    route_lookups: int


FULL = Settings(
    repetitions=3, w1_connections=32, w1_seconds=8, w1_serial_count=1000,
    w2_connections=64, w2_seconds=8, warmup_seconds=1, big_size=1 << 30, w3_parallel=8,
    idle_count=9900, idle_clients=2, route_sizes=(10, 1000, 10000), route_lookups=300_000,
)

SMOKE = Settings(
    repetitions=1, w1_connections=4, w1_seconds=1, w1_serial_count=10,
    w2_connections=8, w2_seconds=1, warmup_seconds=0, big_size=8 << 20, w3_parallel=2,
    idle_count=40, idle_clients=2, route_sizes=(10, 1000, 10000), route_lookups=20_000,
)
