"""`python3 -m fuzz.seeds`: write the seed inputs into fuzz/corpus/<target>/seed-*.

Seeds are real inputs: the captured ClientHellos, and PROXY headers and STUN messages made by the
project's own encoders (what the router writes, what the TURN probe sends and receives). Long
runs then add what they found (`python3 -m fuzz <target> --minimize DIR`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from orama_stealth.wire import proxyproto, stun

ROOT = Path(__file__).resolve().parent.parent
HELLOS = ROOT / "tests" / "fixtures" / "hellos"
CORPUS = ROOT / "fuzz" / "corpus"

_TXID = bytes(range(1, 13))
_PAIRS: dict[str, tuple[proxyproto.Address, proxyproto.Address]] = {
    "ipv4": (("203.0.113.7", 51000), ("192.0.2.1", 443)),
    "ipv6": (("2001:db8::7", 51000), ("2001:db8::1", 443)),
    "mapped": (("::ffff:203.0.113.7", 0), ("2001:db8::1", 65535)),
}


def proxy_seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, (src, dst) in _PAIRS.items():
        out[f"v1-{name}"] = proxyproto.encode_v1(src, dst) + b"\x16\x03\x01"
        out[f"v2-{name}"] = proxyproto.encode_v2(src, dst) + b"\x16\x03\x01"
    # What a receiver must also accept: v1 UNKNOWN, v2 LOCAL, v2 with a TLV after the addresses.
    out["v1-unknown"] = b"PROXY UNKNOWN\r\n"
    v2 = proxyproto.encode_v2(*_PAIRS["ipv4"])
    out["v2-local"] = v2[:12] + b"\x20\x00\x00\x00"
    tlv = b"\x04\x00\x03abc"
    out["v2-tlv"] = v2[:14] + (12 + len(tlv)).to_bytes(2, "big") + v2[16:] + tlv
    return out


def stun_seeds() -> dict[str, bytes]:
    key = stun.long_term_key("user", "orama", "secret")
    peer = ("198.51.100.9", 3478)
    ipv6 = ("2001:db8::9", 50000)
    req, ok, err, ind = (stun.MessageClass.REQUEST, stun.MessageClass.SUCCESS,
                         stun.MessageClass.ERROR, stun.MessageClass.INDICATION)
    return {
        "binding-request": stun.encode(stun.BINDING, req, _TXID,
                                       [(stun.SOFTWARE, b"orama-stealth probe")], fingerprint=True),
        "binding-success": stun.encode(stun.BINDING, ok, _TXID, [
            stun.address_attr(stun.XOR_MAPPED_ADDRESS, peer, _TXID),
            (stun.MAPPED_ADDRESS, b"\x00\x01\x0d\x96\xc6\x33\x64\x09"),
        ], fingerprint=True),
        "allocate-401": stun.encode(stun.ALLOCATE, err, _TXID, [
            (stun.ERROR_CODE, stun.encode_error_code(401, "Unauthorized")),
            (stun.REALM, b"orama"), (stun.NONCE, b"abcdef0123456789"),
        ]),
        "allocate-request": stun.encode(stun.ALLOCATE, req, _TXID, [
            (stun.REQUESTED_TRANSPORT, stun.requested_transport()), (stun.USERNAME, b"user"),
            (stun.REALM, b"orama"), (stun.NONCE, b"abcdef0123456789"),
        ], integrity_key=key, fingerprint=True),
        "allocate-success": stun.encode(stun.ALLOCATE, ok, _TXID, [
            stun.address_attr(stun.XOR_RELAYED_ADDRESS, ipv6, _TXID),
            stun.address_attr(stun.XOR_MAPPED_ADDRESS, peer, _TXID),
            (stun.LIFETIME, stun.encode_u32(600)),
        ], integrity_key=key),
        "data-indication": stun.encode(stun.DATA, ind, _TXID, [
            stun.address_attr(stun.XOR_PEER_ADDRESS, peer, _TXID), (stun.DATA_ATTR, b"ping!"),
        ]),
        "send-indication": stun.encode(stun.SEND, ind, _TXID, [
            stun.address_attr(stun.XOR_PEER_ADDRESS, ipv6, _TXID), (stun.DATA_ATTR, b"x" * 33),
        ]),
    }


def main() -> None:
    for target, seeds in (("proxyproto", proxy_seeds()), ("stun", stun_seeds())):
        (CORPUS / target).mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (CORPUS / target / f"seed-{name}").write_bytes(data)
    (CORPUS / "clienthello").mkdir(parents=True, exist_ok=True)
    for hello in sorted(HELLOS.glob("*.bin")):
        shutil.copyfile(hello, CORPUS / "clienthello" / f"seed-{hello.stem}")


if __name__ == "__main__":
    main()
