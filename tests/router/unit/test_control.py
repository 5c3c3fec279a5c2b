"""The supervisor <-> worker channel's framing, and the loop choice."""

from __future__ import annotations

import json

import pytest

from orama_stealth.router import control
from orama_stealth.router.loop import LoopError, choose


def test_messages_survive_any_split_and_come_out_in_order() -> None:
    stream = (
        control.ready("uvloop") + control.reload("/etc/x.yaml", "listen: ':443'\n" * 500)
        + control.failed("RuntimeError: no loop")
    )
    for step in (1, 3, 7, len(stream)):
        dec = control.Decoder()
        got: list[control.Message] = []
        for i in range(0, len(stream), step):
            got += dec.feed(stream[i : i + step])
        assert got == [
            {"type": "ready", "loop": "uvloop"},
            {"type": "reload", "path": "/etc/x.yaml", "text": "listen: ':443'\n" * 500},
            {"type": "failed", "error": "RuntimeError: no loop"},
        ]


@pytest.mark.parametrize("bad", [
    b"\x00\x00\x00\x03abc",  # not JSON
    b"\x00\x00\x00\x02[]",  # not an object
    b"\x00\x00\x00\x02{}",  # no type
    b"\xff\xff\xff\xff",  # absurd length
])
def test_broken_frames_are_errors(bad: bytes) -> None:
    with pytest.raises(control.ControlError):
        control.Decoder().feed(bad)


def test_frame_is_length_then_json() -> None:
    frame = control.ready("asyncio")
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert json.loads(frame[4:]) == {"type": "ready", "loop": "asyncio"}


def test_loop_choice() -> None:
    assert choose("asyncio")[0] == "asyncio"
    assert choose("uvloop")[0] == "uvloop"  # installed with the [fast] extra, as on nodes
    assert choose("")[0] == "uvloop"  # auto prefers it
    with pytest.raises(LoopError, match="expected one of"):
        choose("trio")
