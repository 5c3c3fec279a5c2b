"""Build identity, the handover document, the status file, build_info in /metrics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orama_stealth.router import build, handover, status
from orama_stealth.router.admission import SharedTable, address_key
from orama_stealth.router.config import parse_config
from orama_stealth.router.metrics import StatsRegion, render


def _package(tmp_path: Path) -> Path:
    root = tmp_path / "orama_stealth"
    (root / "router").mkdir(parents=True)
    (root / "__init__.py").write_text('__version__ = "1.2.3"\n')
    (root / "router" / "a.py").write_text("x = 1\n")
    (root / "router" / "__pycache__").mkdir()
    (root / "router" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0junk")
    return root


def test_fingerprint_follows_the_source_not_the_bytecode(tmp_path: Path) -> None:
    root = _package(tmp_path)
    first = build.on_disk(root)
    assert first.version == "1.2.3" and len(first.fingerprint) == build.FINGERPRINT_LEN
    (root / "router" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"other")
    (root / "router" / "notes.txt").write_text("not code")
    assert build.fingerprint(root) == first.fingerprint
    (root / "router" / "a.py").write_text("x = 1\n# a comment\n")
    assert build.fingerprint(root) != first.fingerprint
    (root / "router" / "a.py").write_text("x = 1\n")
    assert build.fingerprint(root) == first.fingerprint
    (root / "router" / "a.py").rename(root / "router" / "b.py")
    assert build.fingerprint(root) != first.fingerprint


def test_running_build_is_the_installed_package() -> None:
    b = build.running()
    assert b is build.running()
    assert b.fingerprint == build.fingerprint()
    assert str(b) == f"{b.version} build {b.fingerprint}"


def test_handover_round_trips_and_names_every_descriptor() -> None:
    cfg = parse_config("listen: 127.0.0.1:8443\nfallback: {name: c, addr: 127.0.0.1:9}\n", "x")
    li = cfg.listeners[0]
    state = handover.State(
        from_build="abc", nworkers=2, workers_setting=2, metrics_listen=["127.0.0.1", 9100],
        metrics_fd=9, generation=4,
        listeners=[handover.HandedListener(li.name, "bound", [5, 6],
                                           handover.listener_definition(li))],
        regions=[handover.HandedRegion(7, 2, 8)],
        workers=[handover.HandedWorker(100, 0, 10, 0), handover.HandedWorker(101, 1, None, 0)],
        counters={"reloads": 3, "retired": {"conns": {"c": 5}}}, pending_reload=True,
    )
    back = handover.decode(state.encode())
    assert back == state
    assert sorted(back.fds()) == [5, 6, 7, 8, 9, 10]
    assert handover.listener_from(back.listeners[0].definition) == li


def test_handover_rejects_what_it_cannot_read() -> None:
    with pytest.raises(handover.HandoverError, match="format"):
        handover.decode('{"format": 99}')
    with pytest.raises(handover.HandoverError):
        handover.decode("not json")
    with pytest.raises(handover.HandoverError):
        handover.listener_from({"name": "https", "unknown_field": 1})


def test_take_removes_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    state = handover.State("abc", 1, 1, None, None, 0)
    monkeypatch.setenv(handover.ENV, state.encode())
    assert handover.take() == state
    assert handover.ENV not in os.environ
    assert handover.take() is None


def test_shared_memory_is_adopted_from_its_descriptor() -> None:
    region = StatsRegion(2)
    region.publish(1, {"conns": {"turn": 3}})
    adopted = StatsRegion(2, os.dup(region.fd))
    assert adopted.read(1) == {"conns": {"turn": 3}}
    adopted.close()
    table = SharedTable(100, 2)
    seat = table.for_worker(1, 100, 2)
    assert seat.admit(address_key("192.0.2.1"))[0] == 0
    again = SharedTable(0, 2, os.dup(table.fd))
    assert again.capacity == table.capacity and again.live() == 1 and again.tracked() == 1
    again.forget(1)
    assert table.live() == 0
    again.close()


def test_status_file_is_replaced_whole(tmp_path: Path) -> None:
    assert status.read(tmp_path) is None
    status.write(tmp_path, status.Status(1, False, "bad", "1.0", "abc", 42))
    status.write(tmp_path, status.Status(2, True, None, "1.0", "def", 42))
    assert status.read(tmp_path) == status.Status(2, True, None, "1.0", "def", 42)
    assert [p.name for p in tmp_path.iterdir()] == [status.FILE]
    (tmp_path / status.FILE).write_text("{half")
    assert status.read(tmp_path) is None


def test_runtime_dir_from_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/a:/run/b")
    assert status.runtime_dir() == Path("/run/a")
    assert status.runtime_dir("/x") == Path("/x")
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert status.runtime_dir() is None


def test_build_info_is_rendered() -> None:
    text = render({}, {}, {"version": "1.0", "build": "abc"})
    assert 'orama_sni_router_build_info{version="1.0",build="abc"} 1' in text.splitlines()
    assert "# TYPE orama_sni_router_build_info gauge" in text
