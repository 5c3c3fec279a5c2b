"""The supervisor <-> worker channel: one framing both ways, JSON objects behind a length.

Each message is a 4-byte big-endian length and a JSON object with a `type`:

- worker -> supervisor: `{"type": "ready", "loop": "uvloop"}` once it serves;
  `{"type": "failed", "error": ...}` as it dies of an exception (so the supervisor can say why
  an upgrade's new workers never served).
- supervisor -> worker: `{"type": "reload", "path": ..., "text": ...}`, the config file's text
  the supervisor has just validated; the worker parses the same text (the file may have changed
  since), so both run exactly the configuration the supervisor accepted.

The codec is sans-IO (`encode`, `Decoder.feed`); the supervisor drives it from its selectors
loop, the worker from an asyncio Protocol (`Channel`).
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable
from typing import Any, cast

_LEN = struct.Struct("!I")
MAX_MESSAGE = 16 << 20  # a config file is far smaller; anything larger is a broken peer

Message = dict[str, Any]


class ControlError(Exception):
    pass


def encode(msg: Message) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


def ready(loop: str) -> bytes:
    return encode({"type": "ready", "loop": loop})


def failed(error: str) -> bytes:
    return encode({"type": "failed", "error": error})


def reload(path: str, text: str) -> bytes:
    return encode({"type": "reload", "path": path, "text": text})


class Decoder:
    """Bytes in, whole messages out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= _LEN.size:
            (length,) = _LEN.unpack_from(self._buf)
            if length > MAX_MESSAGE:
                raise ControlError(f"control message of {length} bytes")
            end = _LEN.size + length
            if len(self._buf) < end:
                break
            try:
                msg = json.loads(bytes(self._buf[_LEN.size : end]))
            except ValueError as e:
                raise ControlError(f"control message is not JSON: {e}") from None
            del self._buf[:end]
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise ControlError("control message without a type")
            out.append(msg)
        return out


class Channel(asyncio.Protocol):
    """The worker's end: messages to `on_message`, the supervisor's disappearance to `on_lost`."""

    def __init__(self, on_message: Callable[[Message], None], on_lost: Callable[[], None]) -> None:
        self._decoder = Decoder()
        self._on_message = on_message
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport; they provide its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except ControlError:
            assert self.transport is not None
            self.transport.close()
            return
        for msg in messages:
            self._on_message(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._on_lost()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
