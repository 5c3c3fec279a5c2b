"""PROXY header parser: only ProxyProtocolError escapes; what it returns is consistent.

A parsed header's length lies within the input, every strict prefix of it is "need more", the
addresses are plain IP texts without a scope id, and encoding them again parses back to the same
addresses.
"""

from __future__ import annotations

import ipaddress

from orama_stealth.wire.proxyproto import (
    Address,
    ProxyHeader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    parse,
)


def _parse(data: bytes) -> tuple[ProxyHeader, int] | ProxyProtocolError | None:
    try:
        return parse(data)
    except ProxyProtocolError as e:
        return e


def _canonical(addr: Address) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, addr[1]
    return ip, addr[1]


def _check_address(addr: Address) -> None:
    host, port = addr
    assert isinstance(port, int) and 0 <= port <= 65535, f"port {port!r}"
    assert host.isascii() and host.isprintable() and "%" not in host, f"address {host!r}"
    ipaddress.ip_address(host)


def check(data: bytes) -> None:
    got = _parse(data)
    if got is None or isinstance(got, ProxyProtocolError):
        return
    header, length = got
    assert 0 < length <= len(data), f"header length {length} outside the {len(data)} bytes"
    assert header.version in (1, 2)
    assert (header.src is None) == (header.dst is None), "one address without the other"
    # The header alone parses the same; any strict prefix of it needs more bytes.
    assert _parse(data[:length]) == (header, length), "header alone parses differently"
    for cut in {0, 1, length // 2, length - 1}:
        assert _parse(data[:cut]) is None, f"prefix of {cut} bytes is not 'need more'"
    if header.src is None or header.dst is None:
        return
    _check_address(header.src)
    _check_address(header.dst)
    for encoder in (encode_v1, encode_v2):
        again = parse(encoder(header.src, header.dst))
        assert again is not None
        src, dst = again[0].src, again[0].dst
        assert src is not None and dst is not None
        assert (_canonical(src), _canonical(dst)) == (
            _canonical(header.src),
            _canonical(header.dst),
        ), f"{encoder.__name__} does not round-trip {header}"
