"""Hand :443/:80 between Caddy and the router with a listening socket behind every new
connection, on a Caddy that cannot take an inherited socket (Debian 12's 2.6).

Two tools make the handover gapless:

- A kernel redirect in a table of our own: new connections *to this node* on :443/:80 go to
  Caddy's other ports while the owner of :443/:80 changes. Only a connection whose first packet
  the kernel sees is a SYN is redirected: one already running when the table appears (picked
  up mid-stream by conntrack) keeps going where it went.
- Caddy listening on both port pairs at once (its adapted JSON with the other ports added):
  a Caddy reload binds the new listeners before it closes the old ones, so the redirect's
  target is listening whenever the redirect is.

Deleting the redirect rules can take the node's conntrack hooks with them (when nothing else
on the node uses conntrack), and a connection redirected until then loses its translation
(measured: the next request on it gets no answer). So the rules are swapped, in one
transaction, for one that only keeps conntrack in use; the table goes once no redirected
connection is open any more (bounded wait).
"""

from __future__ import annotations

import copy
import json
import shlex
from typing import Any

from orama_stealth.deploy import layout

TABLE = "orama_stealth_handover"
DUAL_JSON = f"{layout.STAGING}/caddy-handover.json"
REDIRECT_RULES = f"{layout.STAGING}/handover.nft"
RESTORED_CADDYFILE = f"{layout.STAGING}/Caddyfile.restored"
HANDOVER_HTTP_SERVER = "orama_handover_http"
# Long enough for the short requests redirected during the switch to finish; a connection
# kept open longer than this through the redirect is cut when the table goes.
DRAIN_SECONDS = 5


class HandoverError(ValueError):
    """The adapted Caddy config cannot be given both port pairs."""


def _port(addr: str) -> int | None:
    tail = addr.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _with_port(addr: str, port: int) -> str:
    return f"{addr.rsplit(':', 1)[0]}:{port}"


def dual_config(adapted: str, https_extra: int, http_extra: int) -> str:
    """Caddy's adapted JSON serving its own ports and the other pair too: every server on the
    HTTPS port also listens on `https_extra`; one plain-HTTP server on `http_extra` answers as
    the HTTP port does (the operator's http:// sites, then Caddy's redirect to HTTPS).

    The HTTP side is a separate server with automatic HTTPS off: a server listening on the
    HTTP port and another port would be taken for an HTTPS server by automatic HTTPS, and
    Caddy's own redirect server on the HTTP port is made at load time, not in the JSON."""
    try:
        cfg: dict[str, Any] = json.loads(adapted)
        http = cfg["apps"]["http"]
        servers: dict[str, Any] = http["servers"]
    except (ValueError, KeyError, TypeError) as exc:
        raise HandoverError(f"the adapted Caddyfile has no HTTP servers ({exc})") from exc
    if not isinstance(servers, dict) or not servers:
        raise HandoverError("the adapted Caddyfile has no HTTP servers")
    https_port = int(http.get("https_port", 443))
    http_port = int(http.get("http_port", 80))
    if HANDOVER_HTTP_SERVER in servers:
        raise HandoverError(f"the Caddyfile already has a server named {HANDOVER_HTTP_SERVER}")
    out = copy.deepcopy(cfg)
    out_servers: dict[str, Any] = out["apps"]["http"]["servers"]
    http_routes: list[Any] = []
    http_addrs: list[str] = []
    placed = False
    for srv in out_servers.values():
        listen = [str(a) for a in srv.get("listen", [])]
        ports = {_port(a) for a in listen}
        if ports == {http_port}:
            http_routes += copy.deepcopy(srv.get("routes", []))
            http_addrs += [_with_port(a, http_extra) for a in listen]
            continue
        extra = [_with_port(a, https_extra) for a in listen if _port(a) == https_port]
        if extra:
            srv["listen"] = listen + [a for a in extra if a not in listen]
            placed = True
    if not placed:
        raise HandoverError(f"no server of the adapted Caddyfile listens on its HTTPS port "
                            f"{https_port}")
    redirect = {"handle": [{"handler": "static_response", "status_code": 308, "headers": {
        "Location": ["https://{http.request.host}{http.request.uri}"],
        "Connection": ["close"]}}]}
    out_servers[HANDOVER_HTTP_SERVER] = {
        "listen": list(dict.fromkeys(http_addrs)) or [f":{http_extra}"],
        "routes": [*http_routes, redirect],
        "automatic_https": {"disable": True},
    }
    return json.dumps(out, sort_keys=True)


def redirect_rules(https_to: int, http_to: int) -> str:
    """nft script: new connections to this node's :443/:80 go to https_to/http_to.
    `fib daddr type local` leaves forwarded traffic (containers' outbound :443) alone; the
    SYN match leaves connections already open alone."""
    rules = "\n".join(
        f"\t\tfib daddr type local tcp flags & (syn | ack) == syn tcp dport {src} "
        f"redirect to :{dst}"
        for src, dst in ((443, https_to), (80, http_to)))
    return (f"table inet {TABLE} {{\n"
            f"\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; "
            f"policy accept;\n{rules}\n\t}}\n"
            f"\tchain output {{\n\t\ttype nat hook output priority -100; "
            f"policy accept;\n{rules}\n\t}}\n}}\n")


def remove_redirect(https_to: int, http_to: int) -> str:
    """Shell: stop redirecting new connections, wait (bounded) until no redirected connection
    is open, then delete the table. Harmless when there is no table."""
    ct = "/proc/net/nf_conntrack"
    live = (f"grep -Eq '(ESTABLISHED|SYN_SENT|SYN_RECV).* dport=(443|80) .* "
            f"sport=({https_to}|{http_to}) ' {ct}")
    return "\n".join([
        f"if nft list table inet {TABLE} >/dev/null 2>&1; then",
        f"  printf '%s\\n' {shlex.quote(_keep_conntrack())} | nft -f -",
        f"  if [ -r {ct} ]; then",
        f"    for i in $(seq 1 {DRAIN_SECONDS * 10}); do {live} || break; sleep 0.1; done",
        "  else",
        "    sleep 1",
        "  fi",
        f"  nft delete table inet {TABLE}",
        "fi",
    ])


def _keep_conntrack() -> str:
    return "\n".join(line for chain in ("prerouting", "output") for line in (
        f"flush chain inet {TABLE} {chain}",
        f"add rule inet {TABLE} {chain} ct state established counter"))


def delete_table() -> str:
    """Shell: the table gone now, whatever it holds (the trap of a failed step)."""
    return f"nft delete table inet {TABLE} 2>/dev/null || true"


def add_redirect() -> str:
    """Shell: load the staged rules, replacing any table left from before."""
    return f"{delete_table()}; nft -f {REDIRECT_RULES}"


def caddy_reload_json(path: str = DUAL_JSON) -> str:
    """Shell: Caddy loads the JSON config at `path` through its admin API."""
    return f"caddy reload --config {shlex.quote(path)} >/dev/null 2>&1"
