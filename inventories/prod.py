"""Example production inventory: one canary node, then the fleet.

    pyinfra -y inventories/prod.py deploys/cutover.py --limit canary
    pyinfra -y inventories/prod.py deploys/verify.py --limit canary      # watch it for a day
    pyinfra -y inventories/prod.py deploys/cutover.py --limit fleet      # refused until soaked
    pyinfra -y inventories/prod.py deploys/cutover.py --limit fleet --fail-percent 20  # a wave
    pyinfra -y inventories/prod.py deploys/rollback.py --limit node-fra-2
    pyinfra -y inventories/prod.py deploys/verify.py                     # one line per node

Each group is a list of hosts; add groups (wave1, wave2, ...) to roll out in waves with
--limit. After pyinfra's output one line per node says how it ended (docs/cutover.md).

Per-host data keys (group data below applies to every host of the group; host data wins;
`--data key=value` wins over both):
  base_domain         the node's HTTPS name, served by Caddy (required)
  cdn_hosts           stealth names routed to the TURN server; default ["cdn.<base_domain>"]
  namespaces          tenant namespaces; each adds the derived stealth name
                      cdn-<12 hex of sha256(namespace)>.<base_domain>
  turn_tls_addr       the TURN server's TLS listener on the node: auto:PORT (default auto:5349)
                      finds its non-loopback address on the node; an explicit host:port must
                      not be loopback (the TURN server would see every client as 127.0.0.1
                      and Firefox fails: preflight refuses it)
  turn_source         router (default: the TURN server sees the node's address) | client
                      (it sees each client's own address: IP_TRANSPARENT + policy routing;
                      docs/cutover.md "Which address the TURN server sees")
  tls_mode            "acme" (Caddy obtains the cdn certificates; point the TURN server at
                      Caddy's certificate files) or "files" (tls_cert_file/tls_key_file on node)
  proxy_protocol      false | v1 | v2: PROXY header towards Caddy; preflight refuses it unless the
                      node's Caddy lists caddy.listeners.proxy_protocol
  caddy_https_port / caddy_http_port   Caddy's new ports (8443 / 8080)
  probe_address       where this machine reaches the node (default ssh_hostname)
  ca_file             CA bundle (on this machine) for the probes; default the system store
  turn_secret_file    the TURN REST secret (on this machine) for the allocation probe
  gateway_config / gateway_url / gateway_service   optional gateway step (both or neither)
  canary_soak         seconds (or 24h) the canary must have been cut over (default 24h)
  max_concurrent_conns  router-wide connection cap (default 10000)
  acme_ca             ACME directory URL for Caddy (global option), e.g. a staging CA for the
                      canary; default Caddy's own CAs
  acme_ca_root        PEM root (path on the node) Caddy trusts for acme_ca's HTTPS
  turn_cert_name      tls_mode acme: the cdn name whose Caddy certificate the TURN server serves
                      (default the first; coturn serves one certificate, see docs/cutover.md)
  turn_cert_from_caddy  false: leave the TURN server's certificate alone (default true in acme)
  cert_min_days       verify fails when a served certificate has fewer days left (default 14)
  caddy_storage / turnserver_conf / turn_service / turn_group   where Caddy keeps certificates
                      (/var/lib/caddy/.local/share/caddy), the TURN config (/etc/turnserver.conf),
                      its unit (coturn.service) and group (turnserver)
  router_wheel        an orama_stealth-*.whl (on this machine) to ship instead of building one
                      from this checkout: pin the exact release across the fleet
"""

_common = {
    "ssh_user": "root",
    "ssh_key": "~/.ssh/orama_deploy",
    "turn_tls_addr": "auto:5349",
    "tls_mode": "acme",
    "proxy_protocol": False,
    "turn_secret_file": "secrets/turn_shared_secret",
    "canary_soak": "24h",
}

canary = (
    [
        ("node-fra-1", {
            **_common,
            "ssh_hostname": "203.0.113.10",
            "base_domain": "fra-1.orama.example",
            "namespaces": ["myapp"],
            "gateway_config": "/etc/orama/gateway.yaml",
            "gateway_url": "https://fra-1.orama.example",
        }),
    ],
    {},
)

fleet = (
    [
        ("node-fra-2", {**_common, "ssh_hostname": "203.0.113.11",
                        "base_domain": "fra-2.orama.example"}),
        ("node-sgp-1", {**_common, "ssh_hostname": "198.51.100.20",
                        "base_domain": "sgp-1.orama.example",
                        "cdn_hosts": ["cdn.sgp-1.orama.example"]}),
    ],
    {},
)
