"""STUN decoder: only StunError escapes, from decoding or from any accessor of a message.

A decoded message encodes back to itself (byte for byte when its padding is zero), the stream
decoder splits any segmentation of the bytes into the same messages, and the XOR address codec
round-trips.
"""

from __future__ import annotations

import contextlib

from orama_stealth.wire import stun
from orama_stealth.wire.stun import Message, StreamDecoder, StunError

_KEY = b"fuzz-key"
_ADDRESS_ATTRS = (stun.XOR_MAPPED_ADDRESS, stun.XOR_PEER_ADDRESS, stun.XOR_RELAYED_ADDRESS)


def _accessors(m: Message) -> None:
    """Everything a client reads from a response; each may refuse only with StunError."""
    for call in (
        lambda: m.error,
        lambda: m.lifetime,
        m.describe,
        lambda: m.text(stun.SOFTWARE),
        lambda: m.check_integrity(_KEY),
        m.check_fingerprint,
        lambda: stun.decode_plain_address(m.get(stun.MAPPED_ADDRESS) or b""),
    ):
        with contextlib.suppress(StunError):
            call()
    for attr in _ADDRESS_ATTRS:
        value = m.get(attr)
        if value is None:
            continue
        try:
            addr = m.xor_address(attr)
        except StunError:
            continue
        assert addr is not None
        encoded = stun.encode_xor_address(addr, m.txid)
        if len(encoded) == len(value):  # a v4-mapped IPv6 address is re-encoded as IPv4
            assert encoded[1:] == value[1:], f"XOR address {addr} does not round-trip"


def _reencode(m: Message) -> None:
    if len(m.raw) + 32 > stun.MAX_MESSAGE_LEN:
        return  # no room for MESSAGE-INTEGRITY and FINGERPRINT in the length field
    again = stun.decode(stun.encode(m.method, m.cls, m.txid, m.attrs))
    assert (again.method, again.cls, again.txid, again.attrs) == (
        m.method,
        m.cls,
        m.txid,
        m.attrs,
    ), "decode(encode(m)) differs from m"
    if all(m.raw[off + 4 + len(v) : off + 4 + len(v) + (-len(v) % 4)].count(0) == -len(v) % 4
           for (_, v), off in zip(m.attrs, m.offsets, strict=True)):
        assert again.raw == m.raw, "a zero-padded message does not encode to its own bytes"
    kinds = {t for t, _ in m.attrs}
    if not kinds & {stun.MESSAGE_INTEGRITY, stun.FINGERPRINT}:
        signed = stun.decode(
            stun.encode(m.method, m.cls, m.txid, m.attrs, integrity_key=_KEY, fingerprint=True)
        )
        assert signed.check_integrity(_KEY) is True, "own MESSAGE-INTEGRITY does not verify"
        assert signed.check_fingerprint() is True, "own FINGERPRINT does not verify"


def _stream(chunks: list[bytes]) -> tuple[list[bytes], bytes] | None:
    decoder = StreamDecoder()
    out: list[bytes] = []
    try:
        for chunk in chunks:
            out += [m.raw for m in decoder.feed(chunk)]
    except StunError:
        return None
    return out, decoder.pending


def check(data: bytes) -> None:
    try:
        m = stun.decode(data)
    except StunError:
        m = None
    if m is not None:
        assert m.raw == data and len(m.attrs) == len(m.offsets)
        assert stun.message_type(m.method, m.cls) == int.from_bytes(data[:2], "big")
        _accessors(m)
        _reencode(m)
    whole = _stream([data])
    cut = 1 + (sum(data[:32]) * 13) % max(1, len(data))
    split = _stream([data[:1], data[1:cut], data[cut:]])
    assert whole == split, "segmentation changed what the stream decoder yields"
    if whole is not None:
        assert b"".join(whole[0]) + whole[1] == data, "stream decoder lost or invented bytes"
        if m is not None:
            assert whole == ([data], b"")
