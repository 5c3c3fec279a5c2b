"""orama-stealth: TURN-over-TLS on :443 beside Caddy for Orama nodes."""

__version__ = "0.1.0"
