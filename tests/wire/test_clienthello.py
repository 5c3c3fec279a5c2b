"""ClientHelloReader: every outcome on real captured hellos and on hand-built edge cases."""

from __future__ import annotations

import pytest
from wire.hellos import (
    EXPECTED,
    NAME,
    alpn_ext,
    big_hello,
    client_hello,
    ext,
    frame,
    handshake_bytes,
    load,
    records,
    sni_ext,
)

from orama_stealth.wire.clienthello import (
    ClientHello,
    ClientHelloReader,
    HelloError,
    Malformed,
    NoSNI,
    NotTLS,
    TooLarge,
    Truncated,
)


def parse(data: bytes, max_size: int = 16384) -> ClientHello | None:
    return ClientHelloReader(max_size).feed(data)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_hello_whole_and_byte_by_byte(name: str) -> None:
    data = load(name)
    sni, alpn = EXPECTED[name]
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        reader = ClientHelloReader()
        got: ClientHello | None = None
        try:
            for i, c in enumerate(chunks):
                got = reader.feed(c)
                if i < len(chunks) - 1:
                    assert got is None, "hello reported before its last byte"
        except NoSNI as e:
            assert sni is None
            assert e.hello.alpn == alpn
            assert e.hello.raw == data == e.consumed
            continue
        assert got is not None
        assert (got.sni, got.alpn, got.raw) == (sni, alpn, data)


def test_frag512_capture_really_spans_records() -> None:
    recs = records(load("openssl_frag512"))
    assert len(recs) >= 2 and all(ctype == 0x16 for ctype, _ in recs)


def test_raw_keeps_bytes_after_the_hello() -> None:
    data = load("curl")
    reader = ClientHelloReader()
    hello = reader.feed(data + b"\x14\x03\x03\x00\x01\x01")
    assert hello is not None and hello.raw == data + b"\x14\x03\x03\x00\x01\x01"
    later = reader.feed(b"more")
    assert later is not None and later.raw.endswith(b"more") and later.sni == NAME


@pytest.mark.parametrize(
    "first", [b"G", b"GET / HTTP/1.1\r\n", b"SSH-2.0-x\r\n", b"\x80\x2e\x01", b"\x16\x02"]
)
def test_not_tls_recognised_from_first_bytes(first: bytes) -> None:
    reader = ClientHelloReader()
    with pytest.raises(NotTLS) as ei:
        reader.feed(first)
    assert ei.value.consumed == first
    with pytest.raises(NotTLS) as again:
        reader.feed(b" more")
    assert again.value.consumed == first + b" more"
    with pytest.raises(NotTLS):
        reader.feed_eof()


def test_truncated_at_every_cut_of_a_real_hello() -> None:
    data = load("openssl_frag512")
    for cut in range(len(data)):
        reader = ClientHelloReader()
        assert reader.feed(data[:cut]) is None
        with pytest.raises(Truncated) as ei:
            reader.feed_eof()
        assert ei.value.consumed == data[:cut]


def test_no_sni_carries_alpn_for_the_fallback_decision() -> None:
    hs = client_hello([alpn_ext(b"acme-tls/1")])
    with pytest.raises(NoSNI) as ei:
        parse(frame(hs, []))
    assert ei.value.hello.alpn == ("acme-tls/1",) and ei.value.hello.sni is None


def test_hello_without_extensions_is_no_sni() -> None:
    with pytest.raises(NoSNI):
        parse(frame(client_hello(None), []))


def test_sni_of_unknown_name_type_only_is_no_sni() -> None:
    with pytest.raises(NoSNI):
        parse(frame(client_hello([sni_ext(b"x.example", name_type=7)]), []))


def test_sni_lowercased_and_one_trailing_dot_removed() -> None:
    got = parse(frame(client_hello([sni_ext(b"CDN.Example.COM.")]), []))
    assert got is not None and got.sni == "cdn.example.com"


def test_large_hello_over_many_records() -> None:
    hs = big_hello(9000)
    data = frame(hs, [1000] * 9)
    assert len(records(data)) == 9
    got = parse(data)
    assert got is not None and got.sni == NAME and got.alpn == ("h2",) and got.raw == data


def test_hello_at_the_bound_passes_and_one_byte_more_is_too_large() -> None:
    at = frame(big_hello(16384), [16000])
    got = parse(at)
    assert got is not None and got.sni == NAME
    with pytest.raises(TooLarge):
        parse(frame(big_hello(16385), [16000]))


def test_too_large_known_from_the_header_alone() -> None:
    # Only the first record has arrived: the declared length is enough to refuse.
    hs = big_hello(20000)
    first = frame(hs, [100])[: 5 + 100]
    with pytest.raises(TooLarge):
        parse(first)


def test_tiny_records_cannot_make_the_reader_buffer_without_bound() -> None:
    hs = big_hello(2000)
    with pytest.raises(TooLarge):
        parse(frame(hs, [1] * 2000), max_size=2048)


def _bad(hs: bytes, **kw: int) -> None:
    with pytest.raises(Malformed):
        parse(frame(hs, []), **kw)


@pytest.mark.parametrize(
    "exts",
    [
        [sni_ext(b"a.example"), sni_ext(b"b.example")],  # duplicate extension
        [sni_ext(b"a.example", b"b.example")],  # two host_names
        [sni_ext(b"")],  # empty host_name
        [sni_ext(b".")],  # only a dot
        [sni_ext(b"hello.example..")],  # one dot stripped, an empty label left (fuzzer find)
        [sni_ext(b"a..example")],
        [sni_ext(b".example")],
        [sni_ext(b"bad name.example")],  # space could forge log fields
        [sni_ext(b"x\x00.example")],
        [sni_ext(b"a" * 256)],
        [ext(0, b"")],  # empty server_name extension
        [ext(0, b"\x00\x05\x00\x00\x09abc")],  # entry overruns
        [alpn_ext(b"")],  # empty protocol name
        [ext(16, b"\x00\x00")],  # empty ALPN list
        [ext(16, b"\x00\x03\x05h2")],  # name overruns
    ],
)
def test_malformed_extensions(exts: list[bytes]) -> None:
    _bad(client_hello(exts))


def test_malformed_structure() -> None:
    good = client_hello([sni_ext(b"a.example")])
    _bad(b"\x02" + good[1:])  # ServerHello, not ClientHello
    _bad(good[:4] + b"\x02" + good[5:])  # legacy_version major 2
    _bad(client_hello([sni_ext(b"a.example")], session_id=b"\x00" * 33))
    body = good[4:]
    _bad(b"\x01" + (len(body) + 1).to_bytes(3, "big") + body + b"\x00")  # stray byte
    # extensions length claims more than the message holds
    cut = good[:-1]
    _bad(b"\x01" + (len(cut) - 4).to_bytes(3, "big") + cut[4:])


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x00\x00",  # zero-length record
        b"\x16\x03\x01\x40\x01" + b"\x01" * 10,  # record longer than 2^14
        b"\x16\x03\x01\x00\x01\x01" + b"\x17\x03\x03\x00\x01\x00",  # app data mid-hello
        b"\x16\x03\x01\x00\x01\x01" + b"\x16\x04\x03\x00\x01\x00",  # version major 4 later
    ],
)
def test_malformed_framing(data: bytes) -> None:
    with pytest.raises(Malformed):
        parse(data)


def test_errors_carry_every_byte_fed() -> None:
    reader = ClientHelloReader()
    assert reader.feed(b"\x16\x03") is None
    assert reader.feed(b"\x01\x00") is None
    with pytest.raises(Malformed) as ei:
        reader.feed(b"\x00")
    assert ei.value.consumed == b"\x16\x03\x01\x00\x00"
    assert isinstance(ei.value, HelloError)


def test_split_handshake_header_across_records() -> None:
    hs = client_hello([sni_ext(b"split.example")])
    got = parse(frame(hs, [1, 2, 1]))
    assert got is not None and got.sni == "split.example"


def test_real_hello_reframed_into_one_byte_records() -> None:
    hs = handshake_bytes(load("curl"))
    got = parse(frame(hs, [1] * len(hs)))
    assert got is not None and got.sni == NAME and got.alpn == ("h2", "http/1.1")


def test_feed_eof_after_hello_is_truncated_not_other() -> None:
    reader = ClientHelloReader()
    assert reader.feed(load("curl")) is not None
    with pytest.raises(Truncated):
        reader.feed_eof()


def test_alpn_names_with_any_byte_value_decode_instead_of_failing() -> None:
    got = parse(frame(client_hello([sni_ext(b"a.example"), alpn_ext(b"h2", b"\xff\x00x")]), []))
    assert got is not None and got.alpn == ("h2", "\\xff\\x00x")
