"""STUN (RFC 8489) and TURN (RFC 8656) messages: encode, decode, authenticate. Sans-IO.

`decode` takes one whole message; `StreamDecoder` takes a TCP/TLS byte stream, where STUN
messages are self-delimiting by their length field, and yields complete messages. Neither
raises anything but `StunError` on any input.
"""

from __future__ import annotations

import binascii
import enum
import hashlib
import hmac
import ipaddress
import secrets
import stringprep
import struct
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

MAGIC_COOKIE = 0x2112A442
HEADER_LEN = 20
FINGERPRINT_XOR = 0x5354554E
# Far above anything a TURN server sends; bounds the buffer a hostile peer can make us keep.
MAX_MESSAGE_LEN = 65535 + HEADER_LEN

# Methods
BINDING = 0x001
ALLOCATE = 0x003
REFRESH = 0x004
SEND = 0x006
DATA = 0x007
CREATE_PERMISSION = 0x008
CHANNEL_BIND = 0x009

# Attributes
MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
CHANNEL_NUMBER = 0x000C
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
DATA_ATTR = 0x0013
REALM = 0x0014
NONCE = 0x0015
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_TRANSPORT = 0x0019
XOR_MAPPED_ADDRESS = 0x0020
SOFTWARE = 0x8022
FINGERPRINT = 0x8028

TRANSPORT_UDP = 17

Address = tuple[str, int]


class StunError(ValueError):
    """Bytes that are not a valid STUN message; `.data` holds the bytes that were looked at."""

    def __init__(self, message: str, data: bytes = b"") -> None:
        super().__init__(message)
        self.data = data


class MessageClass(enum.IntEnum):
    REQUEST = 0
    INDICATION = 1
    SUCCESS = 2
    ERROR = 3


def message_type(method: int, cls: MessageClass) -> int:
    """Interleave the class bits C1 (bit 8) and C0 (bit 4) into the 12 method bits."""
    c = int(cls)
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 0x1) << 4)
        | ((c & 0x2) << 7)
    )


def split_type(t: int) -> tuple[int, MessageClass]:
    method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2)
    cls = MessageClass(((t >> 4) & 0x1) | ((t >> 7) & 0x2))
    return method, cls


def new_transaction_id() -> bytes:
    return secrets.token_bytes(12)


# --- attribute values -------------------------------------------------------------------------


def _xor_bytes(txid: bytes, length: int) -> bytes:
    cookie = struct.pack("!I", MAGIC_COOKIE)
    return cookie + txid if length == 16 else cookie


def encode_xor_address(addr: Address, txid: bytes) -> bytes:
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    raw = ip.packed
    mask = _xor_bytes(txid, len(raw))
    xored = bytes(a ^ b for a, b in zip(raw, mask, strict=True))
    family = 0x01 if len(raw) == 4 else 0x02
    return struct.pack("!BBH", 0, family, addr[1] ^ (MAGIC_COOKIE >> 16)) + xored


def decode_xor_address(value: bytes, txid: bytes) -> Address:
    if len(value) < 4:
        raise StunError(f"address attribute of {len(value)} bytes, expected 8 or 20", value)
    _, family, xport = struct.unpack_from("!BBH", value)
    size = {1: 4, 2: 16}.get(family)
    if size is None:
        raise StunError(f"address family {family:#x}, expected 0x01 (IPv4) or 0x02 (IPv6)", value)
    if len(value) != 4 + size:
        raise StunError(f"address attribute of {len(value)} bytes, expected {4 + size}", value)
    mask = _xor_bytes(txid, size)
    raw = bytes(a ^ b for a, b in zip(value[4:], mask, strict=True))
    return str(ipaddress.ip_address(raw)), xport ^ (MAGIC_COOKIE >> 16)


def decode_plain_address(value: bytes) -> Address:
    if len(value) not in (8, 20):
        raise StunError(f"address attribute of {len(value)} bytes, expected 8 or 20", value)
    return str(ipaddress.ip_address(value[4:])), struct.unpack_from("!H", value, 2)[0]


def encode_error_code(code: int, reason: str) -> bytes:
    return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode()


def decode_error_code(value: bytes) -> tuple[int, str]:
    if len(value) < 4:
        raise StunError(f"ERROR-CODE of {len(value)} bytes, expected at least 4", value)
    code = (value[2] & 0x07) * 100 + value[3]
    return code, value[4:].decode("utf-8", "replace")


def encode_u32(value: int) -> bytes:
    return struct.pack("!I", value)


def requested_transport(protocol: int = TRANSPORT_UDP) -> bytes:
    return struct.pack("!B3x", protocol)


# --- credentials ------------------------------------------------------------------------------


def saslprep(text: str) -> str:
    """The parts of SASLprep (RFC 4013) that change real passwords: drop B.1, map C.1.2, NFKC."""
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )
    return unicodedata.normalize("NFKC", mapped)


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """MD5(username ":" realm ":" SASLprep(password)), the RFC 8489 long-term credential key."""
    return hashlib.md5(
        f"{username}:{realm}:{saslprep(password)}".encode(), usedforsecurity=False
    ).digest()


def short_term_key(password: str) -> bytes:
    return saslprep(password).encode()


# --- messages ---------------------------------------------------------------------------------


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


@dataclass(frozen=True, slots=True)
class Message:
    method: int
    cls: MessageClass
    txid: bytes
    attrs: tuple[tuple[int, bytes], ...]
    raw: bytes
    # Offset in `raw` of each attribute header, needed to check MESSAGE-INTEGRITY/FINGERPRINT.
    offsets: tuple[int, ...] = ()

    def get(self, attr: int) -> bytes | None:
        for t, v in self.attrs:
            if t == attr:
                return v
        return None

    def text(self, attr: int) -> str | None:
        v = self.get(attr)
        return None if v is None else v.decode("utf-8", "replace")

    def xor_address(self, attr: int) -> Address | None:
        v = self.get(attr)
        return None if v is None else decode_xor_address(v, self.txid)

    @property
    def error(self) -> tuple[int, str] | None:
        v = self.get(ERROR_CODE)
        return None if v is None else decode_error_code(v)

    @property
    def lifetime(self) -> int | None:
        v = self.get(LIFETIME)
        if v is None:
            return None
        if len(v) != 4:
            raise StunError(f"LIFETIME of {len(v)} bytes, expected 4", v)
        return int(struct.unpack("!I", v)[0])

    def _covered(self, attr: int) -> tuple[bytes, bytes] | None:
        """(bytes the attribute protects with the length field adjusted, attribute value)."""
        for (t, v), off in zip(self.attrs, self.offsets, strict=True):
            if t == attr:
                end = off + 4 + len(v)
                head = self.raw[:2] + struct.pack("!H", end - HEADER_LEN) + self.raw[4:off]
                return head, v
        return None

    def check_integrity(self, key: bytes) -> bool | None:
        """None when there is no MESSAGE-INTEGRITY, else whether it matches `key`."""
        covered = self._covered(MESSAGE_INTEGRITY)
        if covered is None:
            return None
        head, value = covered
        return hmac.compare_digest(hmac.new(key, head, hashlib.sha1).digest(), value)

    def check_fingerprint(self) -> bool | None:
        covered = self._covered(FINGERPRINT)
        if covered is None:
            return None
        head, value = covered
        want = (binascii.crc32(head) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        return value == struct.pack("!I", want)

    def describe(self) -> str:
        name = METHOD_NAMES.get(self.method, f"method {self.method:#x}")
        text = f"{name} {self.cls.name.lower()}"
        err = self.error
        if err is not None:
            text += f" {err[0]} {err[1]!r}".rstrip()
        return text


METHOD_NAMES = {
    BINDING: "Binding", ALLOCATE: "Allocate", REFRESH: "Refresh", SEND: "Send", DATA: "Data",
    CREATE_PERMISSION: "CreatePermission", CHANNEL_BIND: "ChannelBind",
}


def header_length(data: bytes) -> int:
    """Total length of the message whose header starts `data` (needs 20 bytes)."""
    if len(data) < HEADER_LEN:
        raise StunError(f"{len(data)} bytes, a STUN header needs {HEADER_LEN}", data)
    t, length, cookie = struct.unpack_from("!HHI", data)
    if t & 0xC000:
        raise StunError(f"first two bits are {t >> 14:#b}, a STUN message starts with 0b00", data)
    if cookie != MAGIC_COOKIE:
        raise StunError(f"magic cookie {cookie:#010x}, expected {MAGIC_COOKIE:#010x}", data)
    if length % 4:
        raise StunError(f"message length {length} is not a multiple of 4", data)
    return HEADER_LEN + int(length)


def decode(data: bytes) -> Message:
    """Decode exactly one whole STUN message."""
    total = header_length(data)
    if len(data) != total:
        raise StunError(f"message of {len(data)} bytes, its header says {total}", data)
    t = struct.unpack_from("!H", data)[0]
    method, cls = split_type(t)
    attrs: list[tuple[int, bytes]] = []
    offsets: list[int] = []
    pos = HEADER_LEN
    while pos < total:
        if pos + 4 > total:
            raise StunError(f"attribute header at byte {pos} runs past the message end", data)
        at, alen = struct.unpack_from("!HH", data, pos)
        end = pos + 4 + alen
        if end > total:
            raise StunError(
                f"attribute {at:#06x} at byte {pos} claims {alen} bytes, past the message end",
                data,
            )
        attrs.append((at, data[pos + 4 : end]))
        offsets.append(pos)
        pos = end + _pad(alen)
    if pos != total:
        raise StunError("attribute padding runs past the message end", data)
    return Message(method, cls, data[8:20], tuple(attrs), bytes(data), tuple(offsets))


def encode(
    method: int,
    cls: MessageClass,
    txid: bytes,
    attrs: Iterable[tuple[int, bytes]] = (),
    *,
    integrity_key: bytes | None = None,
    fingerprint: bool = False,
    pad_byte: bytes = b"\x00",
) -> bytes:
    """Build a message; MESSAGE-INTEGRITY then FINGERPRINT go last, as RFC 8489 requires."""
    if len(txid) != 12:
        raise ValueError(f"transaction id of {len(txid)} bytes, expected 12")
    body = bytearray()
    for at, value in attrs:
        body += struct.pack("!HH", at, len(value)) + value + pad_byte * _pad(len(value))
    t = message_type(method, cls)

    def header(extra: int) -> bytes:
        return struct.pack("!HHI", t, len(body) + extra, MAGIC_COOKIE) + txid

    if integrity_key is not None:
        mac = hmac.new(integrity_key, header(24) + body, hashlib.sha1).digest()
        body += struct.pack("!HH", MESSAGE_INTEGRITY, 20) + mac
    if fingerprint:
        crc = (binascii.crc32(header(8) + body) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        body += struct.pack("!HHI", FINGERPRINT, 4, crc)
    return header(0) + bytes(body)


class StreamDecoder:
    """Split a TCP/TLS byte stream into STUN messages by their length fields."""

    def __init__(self, max_message: int = MAX_MESSAGE_LEN) -> None:
        self._buf = bytearray()
        self._max = max_message
        self.received = 0

    @property
    def pending(self) -> bytes:
        return bytes(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        self.received += len(data)
        out: list[Message] = []
        while len(self._buf) >= HEADER_LEN:
            total = header_length(bytes(self._buf[:HEADER_LEN]))
            if total > self._max:
                raise StunError(f"message of {total} bytes exceeds {self._max}", bytes(self._buf))
            if len(self._buf) < total:
                break
            out.append(decode(bytes(self._buf[:total])))
            del self._buf[:total]
        if self._buf and self._buf[0] & 0xC0:
            # Reject a stream that cannot be STUN as soon as its first byte shows it.
            header_length(bytes(self._buf[:HEADER_LEN]).ljust(HEADER_LEN, b"\x00"))
        return out


def address_attr(attr: int, addr: Address, txid: bytes) -> tuple[int, bytes]:
    return attr, encode_xor_address(addr, txid)

