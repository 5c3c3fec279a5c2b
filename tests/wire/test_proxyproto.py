"""PROXY protocol v1/v2: byte vectors from the HAProxy spec's layout, round trips, refusals."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orama_stealth.wire.proxyproto import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    encode,
    encode_v1,
    encode_v2,
    parse,
)

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")


def test_v2_signature_is_the_spec_constant() -> None:
    assert V2_SIGNATURE == SIG


def test_v1_ipv4_vector() -> None:
    assert (
        encode_v1(("192.0.2.10", 56324), ("198.51.100.1", 443))
        == b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\n"
    )


def test_v1_ipv6_vector() -> None:
    assert (
        encode_v1(("2001:db8::1", 40000), ("2001:db8:0:0::2", 443))
        == b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 443\r\n"
    )


def test_v2_ipv4_vector() -> None:
    want = (
        SIG
        + b"\x21"  # version 2, command PROXY
        + b"\x11"  # AF_INET, STREAM
        + b"\x00\x0c"  # 12 address bytes
        + bytes([192, 0, 2, 10, 198, 51, 100, 1])
        + (56324).to_bytes(2, "big")
        + (443).to_bytes(2, "big")
    )
    assert encode_v2(("192.0.2.10", 56324), ("198.51.100.1", 443)) == want


def test_v2_ipv6_vector() -> None:
    src = ipaddress.IPv6Address("2001:db8::1").packed
    dst = ipaddress.IPv6Address("2001:db8::2").packed
    want = SIG + b"\x21\x21\x00\x24" + src + dst + b"\x9c\x40\x01\xbb"
    assert encode_v2(("2001:db8::1", 40000), ("2001:db8::2", 443)) == want


def test_dual_stack_mapped_addresses_become_plain_ipv4() -> None:
    assert encode("v1", ("::ffff:10.1.2.3", 5), ("::ffff:127.0.0.1", 443)) == (
        b"PROXY TCP4 10.1.2.3 127.0.0.1 5 443\r\n"
    )
    v2 = encode("v2", ("::ffff:10.1.2.3", 5), ("::ffff:127.0.0.1", 443))
    assert v2[13] == 0x11 and len(v2) == 28


def test_mixed_families_are_written_as_ipv6() -> None:
    v1 = encode("v1", ("10.1.2.3", 5), ("::1", 443))
    assert v1 == b"PROXY TCP6 ::ffff:10.1.2.3 ::1 5 443\r\n"
    assert parse(v1) == (ProxyHeader(1, ("::ffff:10.1.2.3", 5), ("::1", 443)), len(v1))
    v2 = encode("v2", ("10.1.2.3", 5), ("::1", 443))
    assert v2[13] == 0x21 and len(v2) == 52


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (("nope", 1), ("1.2.3.4", 2)),
        (("1.2.3.4", 70000), ("1.2.3.4", 2)),
        (("1.2.3.4", -1), ("::1", 2)),
    ],
)
def test_encode_refuses_bad_addresses(src: tuple[str, int], dst: tuple[str, int]) -> None:
    with pytest.raises(ProxyProtocolError):
        encode_v1(src, dst)
    with pytest.raises(ProxyProtocolError):
        encode_v2(src, dst)


def test_encode_refuses_unknown_version() -> None:
    with pytest.raises(ProxyProtocolError, match="v3"):
        encode("v3", ("1.2.3.4", 1), ("1.2.3.4", 2))


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str).filter(lambda a: not a.startswith("::ffff:"))
port = st.integers(0, 65535)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["v1", "v2"]),
    st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)),
    port,
    port,
    st.binary(max_size=20),
)
def test_round_trip_with_payload_behind(
    version: str, ips: tuple[str, str], sport: int, dport: int, payload: bytes
) -> None:
    hdr = encode(version, (ips[0], sport), (ips[1], dport))
    got = parse(hdr + payload)
    assert got is not None
    header, used = got
    assert used == len(hdr)
    assert header.version == int(version[1])
    assert header.src == (ipaddress.ip_address(ips[0]).compressed, sport)
    assert header.dst == (ipaddress.ip_address(ips[1]).compressed, dport)
    # Every strict prefix asks for more bytes instead of failing.
    for i in range(len(hdr)):
        assert parse(hdr[:i]) is None


def test_v1_unknown_and_v2_local() -> None:
    assert parse(b"PROXY UNKNOWN\r\nGET") == (ProxyHeader(1, None, None), 15)
    assert parse(b"PROXY UNKNOWN ::1 ::2 1 2\r\n")[0] == ProxyHeader(1, None, None)  # type: ignore[index]
    local = SIG + b"\x20\x00\x00\x00"
    assert parse(local) == (ProxyHeader(2, None, None), 16)


def test_v2_tlvs_are_skipped() -> None:
    hdr = bytearray(encode_v2(("10.0.0.1", 1000), ("10.0.0.2", 443)))
    tlv = b"\x01\x00\x02h2"  # PP2_TYPE_ALPN
    hdr[14:16] = (12 + len(tlv)).to_bytes(2, "big")
    data = bytes(hdr) + tlv + b"payload"
    assert parse(data) == (
        ProxyHeader(2, ("10.0.0.1", 1000), ("10.0.0.2", 443)),
        16 + 12 + len(tlv),
    )
    assert parse(data[: 16 + 12 + 1]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # too few fields
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",  # family mismatch
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",  # leading zero
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # bare LF
        b"PROXY UNKNOWN \n\r\n",  # bare LF before the CRLF, even after UNKNOWN (fuzzing)
        b"PROXY UNKNOWN \r\r\n",  # bare CR likewise
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # scope id (fuzzing)
        b"PROXY TCP6 ::1 fe80::1%\x1b[31m 1 2\r\n",  # a scope id would carry control bytes
        b"PROXY " + b"x" * 120,  # no CRLF within 107 bytes
        SIG + b"\x11\x11\x00\x0c" + b"\x00" * 12,  # version 1 nibble in a v2 header
        SIG + b"\x22\x11\x00\x0c" + b"\x00" * 12,  # command 2
        SIG + b"\x21\x11\x00\x04" + b"\x00" * 4,  # INET needs 12 bytes
        SIG + b"\x21\x51\x00\x00",  # family 5
    ],
)
def test_parse_refuses(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(data)


def test_v1_verdict_does_not_depend_on_where_the_bytes_end() -> None:
    # Found by fuzzing: the prefix was refused for its bare LF, the whole line accepted.
    data = b"PROXY UNKNOWN \n\r\n"
    for cut in range(len(data) - 1, len(data) + 1):
        with pytest.raises(ProxyProtocolError, match="bare CR or LF"):
            parse(data[:cut])


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=120),
        st.binary(max_size=60).map(lambda b: SIG + b),
        st.binary(max_size=110).map(lambda b: b"PROXY " + b),
    )
)
def test_parse_random_input_returns_or_raises_protocol_error(data: bytes) -> None:
    try:
        got = parse(data)
    except ProxyProtocolError:
        return
    if got is not None:
        assert 0 < got[1] <= len(data)
