"""Admission: exact caps, freeing, bounded table, and exactness across forked workers."""

from __future__ import annotations

import contextlib
import os
import random
import signal

import pytest

from orama_stealth.router.admission import (
    ADMITTED,
    REFUSED_GLOBAL,
    REFUSED_PER_IP,
    LocalAdmission,
    SharedTable,
    address_key,
    table_capacity,
)


def ip(n: int) -> bytes:
    return address_key(f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}")


def test_address_key_maps_ipv4_and_mapped_ipv6_to_one_key() -> None:
    assert address_key("192.0.2.7") == address_key("::ffff:192.0.2.7")
    assert address_key("2001:db8::1") != address_key("2001:db8::2")
    assert address_key("fe80::1%eth0") == address_key("fe80::1")
    assert len(address_key("2001:db8::1")) == 16


@pytest.mark.parametrize("kind", ["local", "shared"])
def test_global_cap_is_exact_and_freed(kind: str) -> None:
    adm = (
        LocalAdmission(5, 0) if kind == "local" else SharedTable(5, 2).for_worker(0, 5, 0)
    )
    got = [adm.admit(ip(i)) for i in range(7)]
    assert [v for v, _ in got] == [ADMITTED] * 5 + [REFUSED_GLOBAL] * 2
    assert adm.total() == 5
    adm.release(ip(0), got[0][1])
    assert adm.admit(ip(99))[0] == ADMITTED
    assert adm.admit(ip(100))[0] == REFUSED_GLOBAL


@pytest.mark.parametrize("kind", ["local", "shared"])
def test_per_ip_cap_counts_one_address_and_forgets_it(kind: str) -> None:
    adm = (
        LocalAdmission(100, 2) if kind == "local" else SharedTable(100, 2).for_worker(1, 100, 2)
    )
    a, b = address_key("198.51.100.1"), address_key("2001:db8::9")
    assert adm.admit(a) == (ADMITTED, True)
    assert adm.admit(a) == (ADMITTED, True)
    assert adm.admit(a) == (REFUSED_PER_IP, False)
    assert adm.admit(b) == (ADMITTED, True)
    assert adm.tracked() == 2
    adm.release(a, True)
    assert adm.admit(a) == (ADMITTED, True)
    for _ in range(2):
        adm.release(a, True)
    adm.release(b, True)
    assert adm.tracked() == 0
    assert adm.total() == 0


def test_table_never_holds_more_than_live_addresses() -> None:
    """A million distinct clients over time, at most 50 at once: the table stays at 50."""
    table = SharedTable(64, 2)
    adm = table.for_worker(0, 64, 3)
    live: list[bytes] = []
    rng = random.Random(7)
    for n in range(20000):
        key = ip(n)
        assert adm.admit(key) == (ADMITTED, True)
        live.append(key)
        if len(live) > 50:
            adm.release(live.pop(rng.randrange(len(live))), True)
        assert table.tracked() == len(live)
    assert table.capacity == table_capacity(64)


def test_random_operations_match_a_dict_model() -> None:
    """Small table, heavy collisions: backward-shift deletion must keep every key findable."""
    table = SharedTable(8, 3)
    handles = [table.for_worker(w, 8, 3) for w in range(3)]
    model: dict[bytes, int] = {}
    held: list[tuple[int, bytes]] = []
    rng = random.Random(1234)
    keys = [ip(n) for n in range(12)]
    for _ in range(5000):
        if held and rng.random() < 0.45:
            w, key = held.pop(rng.randrange(len(held)))
            handles[w].release(key, True)
            model[key] -= 1
            if not model[key]:
                del model[key]
        else:
            w, key = rng.randrange(3), rng.choice(keys)
            verdict, tracked = handles[w].admit(key)
            total = sum(model.values())
            if model.get(key, 0) >= 3:
                assert verdict == REFUSED_PER_IP
            elif total >= 8:
                assert verdict == REFUSED_GLOBAL
            else:
                assert verdict == ADMITTED and tracked
                model[key] = model.get(key, 0) + 1
                held.append((w, key))
        assert table.tracked() == len(model)
        assert table.live() == sum(model.values())


def test_reap_frees_exactly_what_a_dead_worker_held() -> None:
    table = SharedTable(100, 2)
    w0, w1 = table.for_worker(0, 100, 5), table.for_worker(1, 100, 5)
    shared = address_key("203.0.113.5")
    for _ in range(2):
        w0.admit(shared)
        w1.admit(shared)
    w1.admit(address_key("203.0.113.6"))
    assert table.live() == 5 and table.tracked() == 2
    assert table.reap(1) == 3
    assert table.live() == 2 and table.tracked() == 1
    for _ in range(3):
        assert w0.admit(shared)[0] == ADMITTED
    assert w0.admit(shared)[0] == REFUSED_PER_IP


def _child(table: SharedTable, index: int, attempts: int, wfd: int, per_ip: int = 7) -> None:
    adm = table.for_worker(index, 40, per_ip)
    admitted = 0
    for n in range(attempts):
        verdict, _ = adm.admit(address_key(f"192.0.2.{n % 9}"))
        admitted += verdict == ADMITTED
    os.write(wfd, f"{admitted}\n".encode())


def _race(table: SharedTable, workers: int, per_ip: int) -> int:
    """Fork `workers` processes that each try 300 admissions; how many got in."""
    r, w = os.pipe()
    pids = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                _child(table, index, 300, w, per_ip)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(w)
    try:
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        with os.fdopen(r) as f:
            return sum(int(line) for line in f)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_global_cap_without_a_lock_holds_across_forked_workers() -> None:
    """No per-address cap: each worker counts itself in, then reads the sum, without a lock.
    The documented bound is the cap plus workers - 1 at a racing instant, and the shared count
    always equals what was admitted."""
    workers = 4
    table = SharedTable(40, workers)
    admitted = _race(table, workers, per_ip=0)
    assert 40 - (workers - 1) <= admitted <= 40 + (workers - 1)
    assert table.live() == admitted
    assert table.tracked() == 0
    for index in range(workers):
        table.reap(index)
    assert table.live() == 0


def test_caps_are_exact_across_forked_workers() -> None:
    """4 processes race for 40 slots over 9 addresses capped at 7 each: exactly 40 get in."""
    workers = 4
    table = SharedTable(40, workers)
    admitted = _race(table, workers, per_ip=7)
    assert admitted == 40
    assert table.live() == 40
    # 40 connections over 9 addresses capped at 7: at least 6 addresses hold some.
    assert 6 <= table.tracked() <= 9
    for index in range(workers):
        table.reap(index)
    assert table.live() == 0 and table.tracked() == 0
