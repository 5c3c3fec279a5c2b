"""The TURN shared secret (coturn `static-auth-secret`) read from the file an operator keeps."""

from __future__ import annotations

from pathlib import Path

from orama_stealth.wire.turn_auth import CredentialError


def read_secret(path: str | Path) -> str:
    """The shared secret from a file: first line, surrounding whitespace stripped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise CredentialError(f"{p}: cannot read the TURN shared secret: {e.strerror}") from e
    lines = text.strip().splitlines()
    if not lines or not lines[0].strip():
        raise CredentialError(f"{p}: empty, expected the TURN shared secret on the first line")
    return lines[0].strip()
