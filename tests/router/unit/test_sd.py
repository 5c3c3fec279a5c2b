"""systemd notify and socket-activation parsing against real sockets."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from orama_stealth.router import sd


def test_notify_reaches_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        srv.settimeout(5)
        assert sd.notify("READY=1\nSTATUS=ok", {"NOTIFY_SOCKET": str(path)})
        assert srv.recv(4096) == b"READY=1\nSTATUS=ok"


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"orama-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name)
        srv.settimeout(5)
        assert sd.notify(sd.reloading_message(), {"NOTIFY_SOCKET": "@" + name})
        fields = dict(line.split("=", 1) for line in srv.recv(4096).decode().splitlines())
        assert fields["RELOADING"] == "1"
        assert int(fields["MONOTONIC_USEC"]) > 0


def test_notify_without_systemd_is_a_no_op() -> None:
    assert not sd.notify("READY=1", {})


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert sd.watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert sd.watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}) is None
    me = str(os.getpid())
    assert sd.watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": me}) == 2.0
    assert sd.watchdog_interval({}) is None


def test_listen_fds_for_another_process_are_ignored_and_cleared() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "https"}
    assert sd.listen_fds(env) == []
    assert env == {}
