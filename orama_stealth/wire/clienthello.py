"""Sans-IO reader for the TLS ClientHello: the SNI and ALPN a router needs, nothing more.

Bytes go in as they arrive from the socket (any segmentation, down to one byte per call); a
`ClientHello` comes out once the whole handshake message has arrived, possibly over several TLS
records (legal TLS, and what large post-quantum hellos and `openssl -max_send_frag` produce).
The reader never decrypts or answers anything; it only looks, and keeps every byte it was given
so the caller can replay them verbatim to the backend.

Every failure is a `HelloError` subclass, so a caller needs exactly one `except` clause and can
still tell plain HTTP on :443 (`NotTLS`) from garbage (`Malformed`) from abuse (`TooLarge`) from
a peer that left (`Truncated`) from a client that connected by IP (`NoSNI`).

The common case (the whole hello in one record, in one segment) parses straight out of the
caller's buffer with `struct.unpack_from`: no reassembly buffer, no per-byte Python loop.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NoReturn

__all__ = [
    "DEFAULT_MAX_SIZE",
    "ClientHello",
    "ClientHelloReader",
    "HelloError",
    "Malformed",
    "NoSNI",
    "NotTLS",
    "TooLarge",
    "Truncated",
]

DEFAULT_MAX_SIZE = 16384

_CONTENT_HANDSHAKE = 0x16
_HANDSHAKE_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0x0000
_EXT_ALPN = 0x0010
_NAME_TYPE_HOST = 0x00
# RFC 8446 5.1: a TLSPlaintext fragment MUST NOT exceed 2^14 bytes.
_MAX_RECORD = 1 << 14
_RECORD_HEADER = 5
_HS_HEADER = 4
_MAX_HOSTNAME = 255
# Bytes a DNS host name may carry (LDH, plus "_" which real deployments use). Anything else in
# an SNI is refused here so it can never reach a log line or a route lookup.
_HOSTNAME_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._"

_U16 = struct.Struct("!H")
_U16U16 = struct.Struct("!HH")
_RECORD = struct.Struct("!BBBH")


@dataclass(frozen=True, slots=True)
class ClientHello:
    sni: str | None
    alpn: tuple[str, ...]
    raw: bytes


class HelloError(Exception):
    """The bytes are not a usable ClientHello. `.consumed` holds every byte fed so far."""

    def __init__(self, message: str, consumed: bytes = b"") -> None:
        super().__init__(message)
        self.message = message
        self.consumed = consumed


class NotTLS(HelloError):
    """The first bytes are not a TLS handshake record (plain HTTP, SSH, a port scanner...)."""


class Malformed(HelloError):
    """TLS framing or the ClientHello structure is invalid."""


class TooLarge(HelloError):
    """The hello (or the records carrying it) exceeds the reader's bound."""


class Truncated(HelloError):
    """The peer closed before a whole hello arrived."""


class NoSNI(HelloError):
    """A valid hello without server_name (a client that connected by IP). `.hello` has ALPN."""

    def __init__(self, message: str, hello: ClientHello, consumed: bytes = b"") -> None:
        super().__init__(message, consumed)
        self.hello = hello


def _parse_sni(buf: bytes, p: int, end: int) -> str:
    if end - p < 2:
        raise Malformed("server_name extension shorter than its list length")
    (list_len,) = _U16.unpack_from(buf, p)
    p += 2
    if p + list_len != end:
        raise Malformed(
            f"server_name list length {list_len} does not match extension length {end - p + 2}"
        )
    if list_len == 0:
        raise Malformed("server_name list is empty")
    host: bytes | None = None
    while p < end:
        if end - p < 3:
            raise Malformed("server_name entry header truncated")
        name_type = buf[p]
        (name_len,) = _U16.unpack_from(buf, p + 1)
        p += 3
        if p + name_len > end:
            raise Malformed(f"server_name entry length {name_len} overruns the list")
        if name_type == _NAME_TYPE_HOST:
            if host is not None:
                raise Malformed("server_name lists more than one host_name")
            host = buf[p : p + name_len]
        p += name_len
    if host is None:
        # Only unknown name types: as if the extension were absent (RFC 6066 3).
        return ""
    if not host or len(host) > _MAX_HOSTNAME:
        raise Malformed(f"server_name host_name has length {len(host)}, expected 1..255")
    if host.translate(None, _HOSTNAME_BYTES):
        raise Malformed(f"server_name host_name has bytes outside [A-Za-z0-9._-]: {host[:64]!r}")
    name = host.decode("ascii").lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise Malformed("server_name host_name is only a dot")
    # One trailing dot is the absolute form of a name; any other empty label ("a..b", ".a",
    # "a..") names no host, and would leave a dot for route matching to stumble on.
    if "" in name.split("."):
        raise Malformed(f"server_name host_name has an empty label: {name[:64]!r}")
    return name


def _parse_alpn(buf: bytes, p: int, end: int) -> tuple[str, ...]:
    if end - p < 2:
        raise Malformed("ALPN extension shorter than its list length")
    (list_len,) = _U16.unpack_from(buf, p)
    p += 2
    if p + list_len != end:
        raise Malformed(
            f"ALPN list length {list_len} does not match extension length {end - p + 2}"
        )
    if list_len < 2:
        raise Malformed("ALPN list is empty")
    names: list[str] = []
    while p < end:
        n = buf[p]
        p += 1
        if n == 0 or p + n > end:
            raise Malformed(f"ALPN protocol name length {n} is zero or overruns the list")
        # Any byte value is legal in ALPN; a name must never fail to decode, and control bytes
        # must not reach a log line raw, so both come out as \xNN escapes.
        name = buf[p : p + n].decode("ascii", "backslashreplace")
        if not name.isprintable():
            name = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in name)
        names.append(name)
        p += n
    return tuple(names)


def _parse_body(buf: bytes, p: int, end: int) -> tuple[str | None, tuple[str, ...]]:
    """Parse a ClientHello body buf[p:end] (after the 4-byte handshake header)."""
    if end - p < 35:
        raise Malformed(f"ClientHello body is {end - p} bytes, shorter than version+random")
    if buf[p] != 3:
        raise Malformed(f"ClientHello legacy_version major is {buf[p]}, expected 3")
    p += 34
    sid_len = buf[p]
    p += 1
    if sid_len > 32 or p + sid_len > end:
        raise Malformed(f"legacy_session_id length {sid_len} exceeds 32 or the message")
    p += sid_len
    if end - p < 2:
        raise Malformed("ClientHello ends before cipher_suites")
    (cs_len,) = _U16.unpack_from(buf, p)
    p += 2
    if cs_len < 2 or cs_len & 1 or p + cs_len > end:
        raise Malformed(f"cipher_suites length {cs_len} is odd, zero or overruns the message")
    p += cs_len
    if end - p < 1:
        raise Malformed("ClientHello ends before compression_methods")
    cm_len = buf[p]
    p += 1
    if cm_len < 1 or p + cm_len > end:
        raise Malformed(f"compression_methods length {cm_len} is zero or overruns the message")
    p += cm_len
    if p == end:
        return None, ()  # a hello without extensions (SSL 3.0 style) carries no SNI
    if end - p < 2:
        raise Malformed("ClientHello has one stray byte where extensions should start")
    (ext_len,) = _U16.unpack_from(buf, p)
    p += 2
    if p + ext_len != end:
        raise Malformed(
            f"extensions length {ext_len} does not match the {end - p} bytes left in the message"
        )
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    # Only the two extensions that steer routing are checked for duplicates (a second SNI could
    # make the router and the backend disagree on the name); the backend judges the rest.
    seen_sni = seen_alpn = False
    unpack = _U16U16.unpack_from
    while p < end:
        if end - p < 4:
            raise Malformed("extension header truncated")
        etype, elen = unpack(buf, p)
        p += 4
        if p + elen > end:
            raise Malformed(f"extension {etype:#06x} length {elen} overruns the extensions")
        if etype == _EXT_SERVER_NAME:
            if seen_sni:
                raise Malformed("server_name extension appears twice")
            seen_sni = True
            sni = _parse_sni(buf, p, p + elen) or None
        elif etype == _EXT_ALPN:
            if seen_alpn:
                raise Malformed("ALPN extension appears twice")
            seen_alpn = True
            alpn = _parse_alpn(buf, p, p + elen)
        p += elen
    return sni, alpn


class ClientHelloReader:
    """Feed bytes as they arrive; get a `ClientHello` once the whole handshake message is in.

    `max_size` bounds the ClientHello handshake message (header included). The records that
    carry it may add their 5-byte headers on top, up to `2 * max_size` in all, so a peer cannot
    make the reader buffer without bound by sending tiny records.
    """

    __slots__ = ("_done", "_error", "_hs", "_max", "_pos", "_raw")

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if max_size < 64:
            raise ValueError(f"max_size must be at least 64 bytes, got {max_size}")
        self._max = max_size
        self._raw: bytes | bytearray = b""
        self._pos = 0  # offset in _raw of the next unread record header
        self._hs = bytearray()  # handshake bytes reassembled from records, slow path only
        self._done: ClientHello | None = None
        self._error: HelloError | None = None

    def feed(self, data: bytes) -> ClientHello | None:
        """Add bytes; return the hello once complete, None while more bytes are needed."""
        if not self._raw:
            self._raw = bytes(data)
        elif data:
            if isinstance(self._raw, bytes):
                self._raw = bytearray(self._raw)
            self._raw += data
        if self._error is not None:
            self._fail(self._error)
        if self._done is not None:
            if len(self._done.raw) != len(self._raw):
                self._done = ClientHello(self._done.sni, self._done.alpn, bytes(self._raw))
            return self._done
        try:
            hello = self._advance()
        except HelloError as e:
            self._fail(e)
        except (IndexError, struct.error, UnicodeError) as e:  # pragma: no cover - safety net
            self._fail(Malformed(f"ClientHello structure invalid: {e}"))
        if hello is not None and hello.sni is None:
            self._fail(NoSNI("ClientHello has no server_name", hello))
        return hello

    def feed_eof(self) -> NoReturn:
        """The peer closed its side: the hello can never complete."""
        if self._error is not None:
            self._fail(self._error)
        if self._done is not None:
            self._fail(Truncated("feed_eof after a complete ClientHello"))
        self._fail(
            Truncated(f"peer closed after {len(self._raw)} bytes, before the ClientHello completed")
        )

    def _fail(self, e: HelloError) -> NoReturn:
        raw = bytes(self._raw)
        if isinstance(e, NoSNI):
            hello = ClientHello(e.hello.sni, e.hello.alpn, raw)
            err: HelloError = NoSNI(e.message, hello, raw)
        else:
            err = type(e)(e.message, raw)
        self._error = err
        raise err

    def _advance(self) -> ClientHello | None:
        raw = self._raw
        n = len(raw)
        # Fast path: the first segment holds a whole record that holds the whole hello.
        if self._pos == 0 and n >= 9:
            ctype, major, _minor, rlen = _RECORD.unpack_from(raw, 0)
            if (
                ctype == _CONTENT_HANDSHAKE
                and major == 3
                and 0 < rlen <= _MAX_RECORD
                and n >= _RECORD_HEADER + rlen
                and _RECORD_HEADER + rlen <= 2 * self._max
                and raw[5] == _HANDSHAKE_CLIENT_HELLO
            ):
                mlen = int.from_bytes(raw[6:9])
                if _HS_HEADER + mlen <= rlen and _HS_HEADER + mlen <= self._max:
                    return self._finish(raw, 9, 9 + mlen)
        while True:
            pos = self._pos
            avail = n - pos
            if pos == 0:
                # Recognise plain HTTP (or anything else) from the very first bytes.
                if avail >= 1 and raw[0] != _CONTENT_HANDSHAKE:
                    raise NotTLS(f"first byte {raw[0]:#04x} is not a TLS handshake record")
                if avail >= 2 and raw[1] != 3:
                    raise NotTLS(f"record version major {raw[1]} is not 3")
            if avail < _RECORD_HEADER:
                return None
            ctype, major, _minor, rlen = _RECORD.unpack_from(raw, pos)
            if ctype != _CONTENT_HANDSHAKE:
                raise Malformed(f"record {ctype:#04x} at offset {pos} interrupts the ClientHello")
            if major != 3:
                raise Malformed(f"record at offset {pos} has version major {major}, expected 3")
            if rlen == 0 or rlen > _MAX_RECORD:
                raise Malformed(f"record at offset {pos} has length {rlen}, expected 1..16384")
            # Checked on the header, before the fragment arrives, so the verdict does not
            # depend on how the bytes were segmented.
            if pos + _RECORD_HEADER + rlen > 2 * self._max:
                raise TooLarge(f"records carrying the ClientHello exceed {2 * self._max} bytes")
            if avail < _RECORD_HEADER + rlen:
                return None
            self._hs += raw[pos + _RECORD_HEADER : pos + _RECORD_HEADER + rlen]
            self._pos = pos + _RECORD_HEADER + rlen
            hs = self._hs
            if hs[0] != _HANDSHAKE_CLIENT_HELLO:
                raise Malformed(f"handshake message type {hs[0]} is not ClientHello (1)")
            if len(hs) >= _HS_HEADER:
                mlen = int.from_bytes(hs[1:4])
                if _HS_HEADER + mlen > self._max:
                    raise TooLarge(
                        f"ClientHello of {_HS_HEADER + mlen} bytes exceeds the {self._max} bound"
                    )
                if len(hs) >= _HS_HEADER + mlen:
                    return self._finish(bytes(hs), _HS_HEADER, _HS_HEADER + mlen)

    def _finish(self, buf: bytes | bytearray, start: int, end: int) -> ClientHello:
        sni, alpn = _parse_body(bytes(buf) if isinstance(buf, bytearray) else buf, start, end)
        self._done = ClientHello(sni, alpn, bytes(self._raw))
        return self._done
