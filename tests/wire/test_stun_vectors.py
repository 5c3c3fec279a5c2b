"""The STUN codec against every RFC 5769 test vector, and the stream decoder on any input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orama_stealth.wire import stun


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


SHORT_TERM_PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"
TXID = unhex("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")

# RFC 5769 2.1: Binding request with SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME,
# MESSAGE-INTEGRITY, FINGERPRINT (USERNAME and SOFTWARE padded with spaces).
SAMPLE_REQUEST = unhex("""
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf
""")
# RFC 5769 2.2: IPv4 response, XOR-MAPPED-ADDRESS 192.0.2.1:32853.
SAMPLE_IPV4_RESPONSE = unhex("""
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96
""")
# RFC 5769 2.3: IPv6 response, XOR-MAPPED-ADDRESS [2001:db8:1234:5678:11:2233:4455:6677]:32853.
SAMPLE_IPV6_RESPONSE = unhex("""
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c
""")
# RFC 5769 2.4: request with long-term authentication (no FINGERPRINT).
SAMPLE_LONG_TERM_REQUEST = unhex("""
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66
""")


def test_sample_request() -> None:
    m = stun.decode(SAMPLE_REQUEST)
    assert (m.method, m.cls, m.txid) == (stun.BINDING, stun.MessageClass.REQUEST, TXID)
    assert m.text(stun.SOFTWARE) == "STUN test client"
    assert m.text(stun.USERNAME) == "evtj:h6vY"
    assert m.check_fingerprint() is True
    assert m.check_integrity(stun.short_term_key(SHORT_TERM_PASSWORD)) is True
    assert m.check_integrity(b"wrong password") is False


@pytest.mark.parametrize(
    ("vector", "mapped"),
    [
        (SAMPLE_IPV4_RESPONSE, ("192.0.2.1", 32853)),
        (SAMPLE_IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_sample_responses(vector: bytes, mapped: tuple[str, int]) -> None:
    m = stun.decode(vector)
    assert (m.method, m.cls) == (stun.BINDING, stun.MessageClass.SUCCESS)
    assert m.xor_address(stun.XOR_MAPPED_ADDRESS) == mapped
    assert m.check_fingerprint() is True
    assert m.check_integrity(stun.short_term_key(SHORT_TERM_PASSWORD)) is True
    # The encoder writes the same bytes (the RFC pads SOFTWARE with a space).
    rebuilt = stun.encode(
        stun.BINDING, stun.MessageClass.SUCCESS, TXID,
        [(stun.SOFTWARE, b"test vector"),
         (stun.XOR_MAPPED_ADDRESS, stun.encode_xor_address(mapped, TXID))],
        integrity_key=stun.short_term_key(SHORT_TERM_PASSWORD), fingerprint=True, pad_byte=b" ",
    )
    assert rebuilt == vector


def test_sample_request_rebuilt_byte_for_byte() -> None:
    attrs = [(t, v) for t, v in stun.decode(SAMPLE_REQUEST).attrs
             if t not in (stun.MESSAGE_INTEGRITY, stun.FINGERPRINT)]
    rebuilt = stun.encode(
        stun.BINDING, stun.MessageClass.REQUEST, TXID, attrs,
        integrity_key=stun.short_term_key(SHORT_TERM_PASSWORD), fingerprint=True, pad_byte=b" ",
    )
    assert rebuilt == SAMPLE_REQUEST


def test_long_term_request() -> None:
    m = stun.decode(SAMPLE_LONG_TERM_REQUEST)
    username = m.text(stun.USERNAME)
    assert username == "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
    assert m.text(stun.REALM) == "example.org"
    assert m.text(stun.NONCE) == "f//499k954d6OL34oL9FSTvy64sA"
    assert m.check_fingerprint() is None
    assert m.check_integrity(stun.long_term_key(username, "example.org", "TheMatrIX")) is True
    # The RFC's password before SASLprep: soft hyphen dropped, NFKC folds ª and Ⅸ.
    raw_password = "The\u00adM\u00aatr\u2168"
    assert m.check_integrity(stun.long_term_key(username, "example.org", raw_password)) is True
    assert m.check_integrity(stun.long_term_key(username, "example.org", "TheMatrix")) is False


def test_a_changed_byte_breaks_fingerprint_and_integrity() -> None:
    data = bytearray(SAMPLE_IPV4_RESPONSE)
    data[30] ^= 1
    m = stun.decode(bytes(data))
    assert m.check_fingerprint() is False
    assert m.check_integrity(stun.short_term_key(SHORT_TERM_PASSWORD)) is False


@pytest.mark.parametrize(
    ("method", "cls", "value"),
    [
        (stun.BINDING, stun.MessageClass.REQUEST, 0x0001),
        (stun.BINDING, stun.MessageClass.SUCCESS, 0x0101),
        (stun.ALLOCATE, stun.MessageClass.ERROR, 0x0113),
        (stun.REFRESH, stun.MessageClass.REQUEST, 0x0004),
        (stun.SEND, stun.MessageClass.INDICATION, 0x0016),
        (stun.DATA, stun.MessageClass.INDICATION, 0x0017),
        (stun.CREATE_PERMISSION, stun.MessageClass.SUCCESS, 0x0108),
    ],
)
def test_message_types(method: int, cls: stun.MessageClass, value: int) -> None:
    assert stun.message_type(method, cls) == value
    assert stun.split_type(value) == (method, cls)


def test_turn_attributes_round_trip() -> None:
    txid = stun.new_transaction_id()
    data = stun.encode(
        stun.ALLOCATE, stun.MessageClass.ERROR, txid,
        [(stun.ERROR_CODE, stun.encode_error_code(438, "Stale Nonce")),
         (stun.REALM, b"orama"), (stun.NONCE, b"abc"), (stun.LIFETIME, stun.encode_u32(600)),
         (stun.REQUESTED_TRANSPORT, stun.requested_transport()),
         stun.address_attr(stun.XOR_RELAYED_ADDRESS, ("2001:db8::7", 50000), txid),
         stun.address_attr(stun.XOR_PEER_ADDRESS, ("::ffff:10.1.2.3", 9), txid),
         (stun.DATA_ATTR, b"\x00payload")],
        fingerprint=True,
    )
    m = stun.decode(data)
    assert m.error == (438, "Stale Nonce")
    assert m.lifetime == 600
    assert m.xor_address(stun.XOR_RELAYED_ADDRESS) == ("2001:db8::7", 50000)
    assert m.xor_address(stun.XOR_PEER_ADDRESS) == ("10.1.2.3", 9)
    assert m.get(stun.DATA_ATTR) == b"\x00payload"
    assert m.get(stun.REQUESTED_TRANSPORT) == bytes([17, 0, 0, 0])
    assert m.check_fingerprint() is True
    assert m.describe() == "Allocate error 438 'Stale Nonce'"


def test_stream_decoder_splits_any_segmentation() -> None:
    stream = SAMPLE_REQUEST + SAMPLE_IPV4_RESPONSE + SAMPLE_IPV6_RESPONSE
    for size in (1, 3, 7, 20, 64, len(stream)):
        dec = stun.StreamDecoder()
        got: list[stun.Message] = []
        for i in range(0, len(stream), size):
            got += dec.feed(stream[i : i + size])
        assert [m.raw for m in got] == [SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE]
        assert dec.pending == b""


def test_stream_decoder_rejects_http_at_once() -> None:
    with pytest.raises(stun.StunError, match="first two bits"):
        stun.StreamDecoder().feed(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(stun.StunError, match="magic cookie"):
        stun.StreamDecoder().feed(b"\x15\x03\x03\x00\x02\x02\x28" + b"\x00" * 13)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (SAMPLE_REQUEST[:-1], "header says"),
        (SAMPLE_REQUEST[:2] + b"\x00\x5c" + SAMPLE_REQUEST[4:], "header says"),
        (SAMPLE_REQUEST[:22] + b"\x40\x00" + SAMPLE_REQUEST[24:], "past the message end"),
        (SAMPLE_REQUEST[:2] + b"\x00\x57" + SAMPLE_REQUEST[4:], "multiple of 4"),
    ],
)
def test_decode_errors_are_specific(data: bytes, message: str) -> None:
    with pytest.raises(stun.StunError, match=message):
        stun.decode(data)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=8))
def test_stream_decoder_raises_only_stun_error(chunks: list[bytes]) -> None:
    dec = stun.StreamDecoder()
    try:
        for c in chunks:
            for m in dec.feed(c):
                m.check_fingerprint()
                m.check_integrity(b"k")
                for t, _ in m.attrs:
                    if t in (stun.XOR_MAPPED_ADDRESS, stun.XOR_PEER_ADDRESS):
                        m.xor_address(t)
                m.error  # noqa: B018
                m.lifetime  # noqa: B018
    except stun.StunError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=20, max_size=120), st.data())
def test_decode_of_plausible_headers_raises_only_stun_error(
    body: bytes, data: st.DataObject
) -> None:
    length = data.draw(st.integers(0, 25)) * 4
    raw = b"\x00\x01" + length.to_bytes(2, "big") + b"\x21\x12\xa4\x42" + body
    try:
        m = stun.decode(raw)
        m.check_fingerprint()
        for t, v in m.attrs:
            if t == stun.XOR_MAPPED_ADDRESS:
                stun.decode_xor_address(v, m.txid)
            if t == stun.ERROR_CODE:
                stun.decode_error_code(v)
    except stun.StunError:
        pass
