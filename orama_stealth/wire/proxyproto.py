"""Sans-IO PROXY protocol (HAProxy spec, versions 1 and 2): encode for backends, parse for tests.

The router writes one header before the client's first byte so Caddy and the TURN server see the
real client address instead of 127.0.0.1. Only TCP over IPv4/IPv6 is encoded; the parser also
accepts LOCAL, UNKNOWN, UNSPEC, UDP, UNIX and TLVs, as a receiver must.

Address normalisation when encoding: an IPv4-mapped IPv6 address (what a dual-stack listener
reports for an IPv4 client) is written as plain IPv4, and if the two ends then differ in family
the IPv4 one is mapped into IPv6, because a header carries a single family for both.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "V1_MAX",
    "V2_SIGNATURE",
    "Address",
    "ProxyHeader",
    "ProxyProtocolError",
    "encode",
    "encode_v1",
    "encode_v2",
    "parse",
]

Address = tuple[str, int]
IP = ipaddress.IPv4Address | ipaddress.IPv6Address

V1_PREFIX = b"PROXY "
# The spec's worst case: "PROXY UNKNOWN ffff:...:ffff ffff:...:ffff 65535 65535\r\n".
V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_HEADER = struct.Struct("!12sBBH")
_V2_CMD_LOCAL = 0x0
_V2_CMD_PROXY = 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_PROTO_STREAM = 0x1
_V2_ADDR_LEN = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}


class ProxyProtocolError(ValueError):
    """A PROXY header (or an address to encode) is invalid."""


@dataclass(frozen=True)
class ProxyHeader:
    version: int
    src: Address | None  # None for LOCAL / UNKNOWN / UNSPEC / UNIX
    dst: Address | None


def _ip(addr: Address, which: str) -> tuple[IP, int]:
    host, port = addr
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise ProxyProtocolError(
            f"{which} address {host!r} is not an IPv4 or IPv6 address"
        ) from None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ProxyProtocolError(f"{which} port {port!r} is not an integer in 0..65535")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, port


def _pair(src: Address, dst: Address) -> tuple[tuple[IP, int], tuple[IP, int]]:
    s, d = _ip(src, "source"), _ip(dst, "destination")
    if s[0].version != d[0].version:
        s, d = (_as_v6(s[0]), s[1]), (_as_v6(d[0]), d[1])
    return s, d


def _as_v6(ip: IP) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)


def encode_v1(src: Address, dst: Address) -> bytes:
    """`PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`."""
    (sip, sport), (dip, dport) = _pair(src, dst)
    fam = "TCP4" if sip.version == 4 else "TCP6"
    return f"PROXY {fam} {_text(sip)} {_text(dip)} {sport} {dport}\r\n".encode("ascii")


def _text(ip: IP) -> str:
    # "::ffff:1.2.3.4" rather than Python 3.11's "::ffff:102:304": same address, readable in logs.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return ip.compressed


def encode_v2(src: Address, dst: Address) -> bytes:
    """Binary header: signature, v2/PROXY, TCP over INET or INET6, then the address block."""
    (sip, sport), (dip, dport) = _pair(src, dst)
    af = _AF_INET if sip.version == 4 else _AF_INET6
    block = sip.packed + dip.packed + struct.pack("!HH", sport, dport)
    return (
        _V2_HEADER.pack(V2_SIGNATURE, 0x20 | _V2_CMD_PROXY, af << 4 | _PROTO_STREAM, len(block))
        + block
    )


def encode(version: str, src: Address, dst: Address) -> bytes:
    if version == "v1":
        return encode_v1(src, dst)
    if version == "v2":
        return encode_v2(src, dst)
    raise ProxyProtocolError(f"PROXY protocol version {version!r} is not 'v1' or 'v2'")


def parse(data: bytes) -> tuple[ProxyHeader, int] | None:
    """Parse a header at the start of `data`.

    Returns None while `data` is a strict prefix of a possible header, else the header and how
    many bytes it took (the proxied stream starts right after). Raises ProxyProtocolError when
    the bytes cannot be a PROXY header.
    """
    n = len(data)
    if data[:12] == V2_SIGNATURE[:n] if n < 12 else data.startswith(V2_SIGNATURE):
        return None if n < 16 else _parse_v2(data)
    if data[:6] == V1_PREFIX[:n] if n < 6 else data.startswith(V1_PREFIX):
        return None if n < 6 else _parse_v1(data)
    raise ProxyProtocolError(f"no PROXY protocol signature at the start: {bytes(data[:16])!r}")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"PROXY v1 line has no CRLF within {V1_MAX} bytes")
        if b"\n" in data[:V1_MAX] or b"\r" in data[: len(data) - 1]:
            raise ProxyProtocolError("PROXY v1 line has a bare CR or LF")
        return None
    if b"\n" in data[:end] or b"\r" in data[:end]:
        # Refused here too, or the verdict would depend on where the bytes were cut.
        raise ProxyProtocolError("PROXY v1 line has a bare CR or LF")
    try:
        line = bytes(data[:end]).decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        # The receiver must ignore whatever follows UNKNOWN.
        return ProxyHeader(1, None, None), end + 2
    if len(parts) != 6:
        raise ProxyProtocolError(
            f"PROXY v1 line has {len(parts)} fields, expected 6 "
            f"(PROXY TCP4|TCP6 src dst sport dport): {line!r}"
        )
    _, fam, s, d, sp, dp = parts
    if fam not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"PROXY v1 protocol {fam!r} is not TCP4, TCP6 or UNKNOWN")
    want = 4 if fam == "TCP4" else 6
    src = (_v1_ip(s, want, "source"), _v1_port(sp, "source"))
    dst = (_v1_ip(d, want, "destination"), _v1_port(dp, "destination"))
    return ProxyHeader(1, src, dst), end + 2


def _v1_ip(text: str, version: int, which: str) -> str:
    # A header carries no scope id; one would let any printable or control byte through.
    if "%" in text:
        raise ProxyProtocolError(f"PROXY v1 {which} address {text!r} has a scope id")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"PROXY v1 {which} address {text!r} is not an IP") from None
    if ip.version != version:
        raise ProxyProtocolError(f"PROXY v1 {which} address {text!r} is not IPv{version}")
    return _text(ip)


def _v1_port(text: str, which: str) -> int:
    # The spec forbids leading zeros; anything but 1-5 plain digits is refused.
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or (
        len(text) > 1 and text[0] == "0"
    ):
        raise ProxyProtocolError(f"PROXY v1 {which} port {text!r} is not a decimal port")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"PROXY v1 {which} port {port} exceeds 65535")
    return port


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    _, ver_cmd, fam, length = _V2_HEADER.unpack_from(data, 0)
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2 version nibble is {ver_cmd >> 4}, expected 2")
    cmd = ver_cmd & 0xF
    if cmd not in (_V2_CMD_LOCAL, _V2_CMD_PROXY):
        raise ProxyProtocolError(f"PROXY v2 command {cmd} is not LOCAL (0) or PROXY (1)")
    af, proto = fam >> 4, fam & 0xF
    if af > _AF_UNIX or proto > 2:
        raise ProxyProtocolError(f"PROXY v2 family/protocol byte {fam:#04x} is not defined")
    total = 16 + length
    if len(data) < total:
        return None
    need = _V2_ADDR_LEN.get(af, 0)
    if length < need:
        raise ProxyProtocolError(
            f"PROXY v2 address length {length} is shorter than {need} for family {af}"
        )
    if cmd == _V2_CMD_LOCAL or af in (_AF_UNSPEC, _AF_UNIX):
        return ProxyHeader(2, None, None), total
    alen = 4 if af == _AF_INET else 16
    block = bytes(data[16 : 16 + need])
    sip = _text(ipaddress.ip_address(block[:alen]))
    dip = _text(ipaddress.ip_address(block[alen : 2 * alen]))
    sport, dport = struct.unpack_from("!HH", block, 2 * alen)
    return ProxyHeader(2, (sip, sport), (dip, dport)), total
