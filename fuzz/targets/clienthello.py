"""ClientHelloReader: only HelloError escapes, and segmentation never changes the verdict.

The input is the byte stream a client sends. It is fed whole, then cut at points that straddle
the record and handshake headers, to a reader with the default bound (or, for one input in four,
a small one); every verdict must be the same whatever the cuts, and a hello's SNI and ALPN must
be what the router may safely route and log.
"""

from __future__ import annotations

import re

from orama_stealth.wire.clienthello import (
    DEFAULT_MAX_SIZE,
    ClientHello,
    ClientHelloReader,
    HelloError,
    NoSNI,
    Truncated,
)

# What the reader promises of a routed name: lower-case LDH (plus "_"), labels joined by dots,
# no trailing dot, at most 255 bytes.
_SNI = re.compile(r"[a-z0-9_.-]{1,255}")

Verdict = tuple[str, str | None, tuple[str, ...]]


def _run(chunks: list[bytes], max_size: int) -> Verdict:
    reader = ClientHelloReader(max_size)
    fed = b""
    got: ClientHello | None = None
    try:
        for chunk in chunks:
            fed += chunk
            got = reader.feed(chunk)
            if got is not None:
                assert got.raw == fed, "hello.raw is not every byte fed"
    except NoSNI as e:
        assert e.consumed == fed == e.hello.raw, "NoSNI does not carry every byte fed"
        assert e.hello.sni is None
        _check_alpn(e.hello.alpn)
        return ("NoSNI", None, e.hello.alpn)
    except HelloError as e:
        assert e.consumed == fed, f"{type(e).__name__}.consumed is not every byte fed"
        # An error is final: the next feed re-raises it, with the new bytes in .consumed.
        try:
            reader.feed(b"x")
        except HelloError as second:
            assert type(second) is type(e), "a second feed changed the error type"
            assert second.consumed == fed + b"x"
        else:
            raise AssertionError("feed after an error returned instead of re-raising") from None
        return (type(e).__name__, None, ())
    if got is None:
        # Not complete yet: end of stream must be Truncated, and only that.
        try:
            reader.feed_eof()
        except Truncated as e:
            assert e.consumed == fed
        else:
            raise AssertionError("feed_eof before a complete hello returned")
        return ("need-more", None, ())
    assert got.sni is not None and _SNI.fullmatch(got.sni), f"SNI {got.sni!r} is not a name"
    assert not got.sni.endswith("."), f"SNI {got.sni!r} keeps its trailing dot"
    _check_alpn(got.alpn)
    # After completion, more bytes extend raw and return the same hello.
    more = reader.feed(b"\x17")
    assert more is not None
    assert (more.sni, more.alpn, more.raw) == (got.sni, got.alpn, fed + b"\x17")
    return ("hello", got.sni, got.alpn)


def _check_alpn(alpn: tuple[str, ...]) -> None:
    for name in alpn:
        assert name and name.isprintable() and name.isascii(), f"ALPN {name!r} reaches logs raw"


def _cuts(data: bytes) -> list[bytes]:
    # Header boundaries (1, 5, 9 bytes) and one more point derived from the content, so the
    # fuzzer can steer it without a separate control channel.
    n = len(data)
    points = sorted({p for p in (1, 5, 6, 9, n // 2, (sum(data[:64]) * 7) % (n + 1)) if 0 < p < n})
    out, prev = [], 0
    for p in [*points, n]:
        out.append(data[prev:p])
        prev = p
    return out


def check(data: bytes) -> None:
    # One input in four goes to a small bound, which reaches TooLarge on inputs the fuzzer can
    # afford to build; the rest to the router's default.
    max_size = 64 + len(data) % 449 if len(data) % 4 == 3 else DEFAULT_MAX_SIZE
    whole = _run([data], max_size)
    split = _run(_cuts(data), max_size)
    assert whole == split, f"segmentation changed the verdict: {whole} vs {split}"
