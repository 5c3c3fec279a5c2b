"""Where the cutover puts things on a node; one place, so rollback undoes exactly these."""

from __future__ import annotations

STATE_DIR = "/var/lib/orama-stealth"
STATE_FILE = f"{STATE_DIR}/state.json"
BACKUPS = f"{STATE_DIR}/backups"
# Points at the backup taken before the first change; only rollback removes it, so a re-run
# never replaces the pre-cutover files with post-cutover ones.
BACKUP_POINTER = f"{BACKUPS}/pre-cutover"
STAGING = f"{STATE_DIR}/staging"
WHEELS = f"{STATE_DIR}/wheels"

VENV = "/opt/orama"
ROUTER_BIN = f"{VENV}/bin/orama-sni-router"
INSTALLED_MARK = f"{VENV}/.orama-stealth-build"

ROUTER_CONFIG = "/etc/orama/sni-router.yaml"
ROUTER_UNIT_NAME = "orama-sni-router.service"
ROUTER_UNIT = f"/etc/systemd/system/{ROUTER_UNIT_NAME}"
# The router's reload outcome (RuntimeDirectory=orama-sni-router, router/status.py).
ROUTER_STATUS = "/run/orama-sni-router/status.json"
# Socket units hold :443/:80 for the router; FileDescriptorName matches the listener names
# of sni-router.yaml ("https" is the main TLS listener, "http" the plain :80 forward).
SOCKETS = {"https": 443, "http": 80}
SOCKET_UNIT_NAMES = tuple(f"orama-sni-router-{name}.socket" for name in SOCKETS)
SOCKET_UNITS = tuple(f"/etc/systemd/system/{unit}" for unit in SOCKET_UNIT_NAMES)
CADDY_DROPIN = "/etc/systemd/system/caddy.service.d/orama-stealth.conf"
# net.ipv4.tcp_migrate_req=1: Caddy 2.6 gives each config its own SO_REUSEPORT socket and
# closes the old one at a reload; the kernel then moves the connections still queued on it to
# the new one instead of resetting them (the router's dials to Caddy, every reload).
SYSCTL_DROPIN = "/etc/sysctl.d/60-orama-stealth.conf"
MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"

DEFAULT_CADDYFILE = "/etc/caddy/Caddyfile"


def backed_up_files(caddyfile: str) -> dict[str, str]:
    """Backup name -> node path of every file the cutover writes."""
    return {
        "Caddyfile": caddyfile,
        "caddy-dropin.conf": CADDY_DROPIN,
        "sni-router.yaml": ROUTER_CONFIG,
        "orama-sni-router.service": ROUTER_UNIT,
        **{unit: f"/etc/systemd/system/{unit}" for unit in SOCKET_UNIT_NAMES},
    }
