"""The fuzz targets: one module per parser that takes bytes from the internet.

Each module exposes `MODULE` (the wire module to instrument for coverage) and `check(data)`,
which raises `AssertionError` (or lets an undocumented exception escape) on a broken promise.
"""

from __future__ import annotations

TARGETS: dict[str, str] = {
    "clienthello": "orama_stealth.wire.clienthello",
    "proxyproto": "orama_stealth.wire.proxyproto",
    "stun": "orama_stealth.wire.stun",
}
