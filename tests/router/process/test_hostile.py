"""Acceptance: hostile traffic against the real router process. A client that resets while its
direction is paused is freed at once; out of descriptors, the router neither spins nor stops
serving, refuses promptly and recovers by itself. (The attack on the connection cap is in
test_hostile_attack.py.)"""

from __future__ import annotations

import contextlib
import resource
import socket
import struct
import time
from pathlib import Path

from support.hostile import (
    NAME,
    Sink,
    cpu_seconds,
    echo_conns,
    echoes,
    fd_count,
    handshake,
    wait_for,
    worker_pids,
)
from support.router import Router, router
from support.tls_backends import Backend, Pki, client_hello

STALL = "stall.example.test"
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close(2) sends a reset


def reset_close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
    s.close()


def worker_of(r: Router) -> int:
    pids = worker_pids(r.pid)
    assert len(pids) == 1, pids
    return pids[0]


def flood_until_stuck(s: socket.socket, stuck_for: float = 0.5, limit: float = 20.0) -> int:
    """Send until the router stops taking bytes for `stuck_for` seconds in a row."""
    s.setblocking(False)
    chunk = bytes(1 << 16)
    sent = 0
    last_progress = time.monotonic()
    deadline = last_progress + limit
    while time.monotonic() < deadline:
        try:
            sent += s.send(chunk)
            last_progress = time.monotonic()
        except BlockingIOError:
            if time.monotonic() - last_progress >= stuck_for:
                return sent
            time.sleep(0.01)
    raise AssertionError(f"the router kept reading for {limit}s ({sent} bytes)")


def test_a_client_that_resets_while_its_direction_is_paused_is_freed_at_once(
    tmp_path: Path, caddy: Backend
) -> None:
    with (
        Sink() as sink,
        router(
            tmp_path, routes=[(STALL, ("stall", sink.addr))], fallback=("caddy", caddy.addr),
            workers=1, max_concurrent_conns=1, idle_timeout="10m",
        ) as r,
    ):
        worker = worker_of(r)
        before = fd_count(worker)
        c = socket.create_connection(("127.0.0.1", r.port), timeout=10)
        try:
            c.sendall(client_hello(STALL))
            # The backend never reads: its buffers fill, then the router's, and the router
            # stops reading this client.
            flood_until_stuck(c)
            assert r.wait_metric("active_connections", 1.0) == 1.0
            # Its two sockets, and the pipe of a direction that switched to splice(2).
            assert fd_count(worker) in (before + 2, before + 4)
        finally:
            reset_close(c)
        t0 = time.monotonic()
        assert wait_for(lambda: fd_count(worker) == before, 5, step=0.005)
        freed_in = time.monotonic() - t0
        print(f"reset paused connection freed in {freed_in * 1000:.1f} ms")
        assert freed_in < 1.0
        assert r.wait_metric("active_connections", 0.0, timeout=1.0) == 0.0
        # Its admission place is free: with a cap of one, the next client gets in.
        with socket.create_connection(("127.0.0.1", r.port), timeout=10) as again:
            again.sendall(client_hello(STALL))
            assert r.wait_metric("active_connections", 1.0) == 1.0
        assert r.metric('limit_refusals_total{limit="global"}') == 0.0


def test_out_of_descriptors_the_router_refuses_promptly_keeps_serving_and_recovers(
    tmp_path: Path, pki: Pki, turn: Backend, caddy: Backend
) -> None:
    with (
        Sink() as sink,
        router(
            tmp_path, routes=[(NAME, ("turn", turn.addr)), (STALL, ("stall", sink.addr))],
            fallback=("caddy", caddy.addr), workers=1,
        ) as r,
        echo_conns(r.port, pki, 5) as established,
        contextlib.ExitStack() as extras_stack,
    ):
        worker = worker_of(r)
        # Room for ten more connections (two descriptors each), then none: soft and hard
        # limit, as the supervisor would raise a soft limit to the hard one.
        limit = fd_count(worker) + 2 * 10
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (limit, limit))
        hello = client_hello(STALL)
        extras = []
        for _ in range(2 * limit):
            s = socket.create_connection(("127.0.0.1", r.port), timeout=10)
            extras_stack.callback(reset_close, s)
            s.sendall(hello)
            extras.append(s)
        r.wait_log(r"event=accept_failed .*errno=EMFILE")
        # Overloaded: new clients keep coming, each refused promptly; the established ones
        # are served; the router's CPU stays low (no busy loop on a readable listener).
        pids = [r.pid, worker]
        cpu0, t0 = cpu_seconds(pids), time.monotonic()
        refusals: list[float] = []
        rounds = 0
        while time.monotonic() - t0 < 3.0:
            ok, took = handshake(r.port, pki, timeout=5)
            assert not ok, "a new connection got in although the router has no descriptor"
            refusals.append(took)
            assert all(echoes(s, rounds) for s in established)
            rounds += 1
            time.sleep(0.1)
        cpu = cpu_seconds(pids) - cpu0
        elapsed = time.monotonic() - t0
        print(
            f"EMFILE overload: router CPU {cpu:.2f}s over {elapsed:.1f}s, {len(refusals)} "
            f"refusals, slowest {max(refusals) * 1000:.0f} ms"
        )
        assert cpu < 0.2 * elapsed, f"router CPU {cpu:.2f}s in {elapsed:.1f}s of overload"
        assert max(refusals) < 1.0
        assert r.metric('accept_failures_total{errno="EMFILE"}') >= 1.0
        line = r.wait_log(r"event=accept_failed .*errno=EMFILE")
        assert " count=" in line
        # The extra connections leave: new clients are served again, by themselves.
        extras_stack.close()
        assert wait_for(lambda: handshake(r.port, pki, timeout=5)[0], 10, step=0.2)
        assert all(echoes(s, 999) for s in established)
        assert r.proc.poll() is None
