"""Probes that speak real TLS, HTTPS, STUN and TURN through :443."""
