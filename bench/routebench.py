"""Micro-benchmark of RouteTable.pick() with tables of different sizes.

Every table gets the same mix of lookups: a third exact hits, a third wildcard hits, a third
misses that fall through to the fallback, drawn from the whole table so a large table is
touched across its size.
"""

from __future__ import annotations

import random
import statistics
import time

from orama_stealth.router.config import Backend, Route
from orama_stealth.router.routes import RouteTable

_ROUNDS = 5


def _table(n: int) -> tuple[RouteTable, list[str]]:
    be = Backend(name="turn-tls", addr="127.0.0.1:5349", host="127.0.0.1", port=5349)
    fallback = Backend(name="caddy", addr="127.0.0.1:8443", host="127.0.0.1", port=8443)
    n_wild = max(1, n // 4)
    exact = [f"cdn-{i:012x}.example.com" for i in range(n - n_wild)]
    wild = [f"ns{i}.example.net" for i in range(n_wild)]
    routes = [Route(match=m, backend=be, line=i) for i, m in enumerate(exact)]
    routes += [Route(match=f"*.{w}", backend=be, line=len(exact) + i) for i, w in enumerate(wild)]
    rng = random.Random(n)
    queries: list[str] = []
    for i in range(3000):
        kind = i % 3
        if kind == 0:
            queries.append(rng.choice(exact))
        elif kind == 1:
            queries.append(f"turn.{rng.choice(wild)}")
        else:
            queries.append(f"www-{rng.randrange(1 << 30):x}.example.org")
    rng.shuffle(queries)
    return RouteTable(routes, fallback), queries


def ns_per_pick(n: int, lookups: int) -> float:
    table, queries = _table(n)
    pick = table.pick
    loops = max(1, lookups // len(queries))
    rounds: list[float] = []
    for _ in range(_ROUNDS):
        t0 = time.perf_counter_ns()
        for _ in range(loops):
            for q in queries:
                pick(q)
        rounds.append((time.perf_counter_ns() - t0) / (loops * len(queries)))
    return statistics.median(rounds)


def run(sizes: tuple[int, ...], lookups: int) -> dict[str, float]:
    return {str(n): ns_per_pick(n, lookups) for n in sizes}
