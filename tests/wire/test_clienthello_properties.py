"""Properties: any input gives a HelloError or a hello; segmentation never changes the verdict."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire.hellos import all_fixtures, frame, handshake_bytes

from orama_stealth.wire.clienthello import ClientHello, ClientHelloReader, HelloError, NoSNI

FIXTURES = all_fixtures()
NAMES = sorted(FIXTURES)
Outcome = tuple[str, str | None, tuple[str, ...], bytes]


def outcome(chunks: list[bytes], eof: bool = False, max_size: int = 16384) -> Outcome:
    """Feed chunks; the verdict as comparable data. Anything but HelloError escapes and fails."""
    reader = ClientHelloReader(max_size)
    got: ClientHello | None = None
    fed = b""
    try:
        for c in chunks:
            fed += c
            got = reader.feed(c)
        if got is None and eof:
            reader.feed_eof()
    except NoSNI as e:
        assert e.consumed == fed == e.hello.raw
        return ("NoSNI", None, e.hello.alpn, b"")
    except HelloError as e:
        # The verdict may come before the last chunk; it then holds what was fed up to there.
        assert e.consumed == fed
        return (type(e).__name__, None, (), b"")
    if got is None:
        return ("need-more", None, (), b"")
    return ("hello", got.sni, got.alpn, got.raw)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes_only_ever_raise_hello_errors(data: bytes, eof: bool) -> None:
    outcome([data], eof=eof)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_behind_a_tls_record_header(body: bytes) -> None:
    # Random bodies behind a plausible header reach the structure parser, not just the framing.
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    outcome([frame(hs, [])], eof=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(NAMES),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_mutated_real_hellos_never_escape(name: str, edits: list[tuple[int, int]]) -> None:
    data = bytearray(FIXTURES[name])
    for pos, val in edits:
        data[pos % len(data)] = val
    whole = outcome([bytes(data)], eof=True)
    assert outcome(split(bytes(data), [p for p, _ in edits]), eof=True) == whole


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(NAMES), st.integers(min_value=1, max_value=400))
def test_mutated_length_fields_and_truncation(name: str, cut: int) -> None:
    data = FIXTURES[name]
    outcome([data[: len(data) - cut % len(data)]], eof=True)
    outcome([data[cut % len(data) :]], eof=True)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(NAMES), st.lists(st.integers(min_value=0), max_size=40))
def test_any_segmentation_gives_the_unsplit_result(name: str, cuts: list[int]) -> None:
    data = FIXTURES[name]
    whole = outcome([data])
    assert whole[0] in ("hello", "NoSNI")
    assert outcome(split(data, cuts)) == whole


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(NAMES),
    st.lists(st.integers(min_value=1, max_value=700), max_size=30),
    st.lists(st.integers(min_value=0), max_size=30),
)
def test_any_record_split_and_segmentation_gives_the_same_hello(
    name: str, sizes: list[int], cuts: list[int]
) -> None:
    data = FIXTURES[name]
    whole = outcome([data])
    reframed = frame(handshake_bytes(data), sizes)
    got = outcome(split(reframed, cuts))
    # Same verdict, SNI and ALPN; raw is the reframed stream, byte for byte.
    assert got[:3] == whole[:3]
    assert got[3] == (reframed if got[0] == "hello" else b"")
