"""What a lab node looks like before the cutover: addresses, names and config file texts.

Pure functions (values in, text out) so the rendered files can be checked without a node.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

DEFAULT_NAME = "labnode"
DEFAULT_BASE_DOMAIN = "lab.orama.test"
DEFAULT_NAMESPACE = "myapp"
# 10.231.77.0/24 for index 0, 10.231.78.0/24 for index 1, ...
SUBNET_BASE = 77
MAX_INDEX = 254 - SUBNET_BASE
TURN_PORT = 3478
TURN_TLS_PORT = 5349

# Where the node keeps what `up` installs (paths inside the node).
NODE_TLS_DIR = "/etc/orama-lab/tls"
NODE_SITE_CERT = f"{NODE_TLS_DIR}/site.crt"
NODE_SITE_KEY = f"{NODE_TLS_DIR}/site.key"
NODE_CDN_CERT = f"{NODE_TLS_DIR}/cdn.crt"
NODE_CDN_KEY = f"{NODE_TLS_DIR}/cdn.key"
NODE_CA_CERT = "/usr/local/share/ca-certificates/orama-lab-ca.crt"
NODE_TURN_SECRET = "/etc/orama-lab/turn_secret"

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,19}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class SpecError(ValueError):
    pass


def check_name(name: str) -> str:
    """Node names become a hostname, a network namespace and an nspawn machine name."""
    if not _NAME.match(name):
        raise SpecError(
            f"node name {name!r}: expected 1-20 characters of a-z, 0-9 and '-', "
            "starting with a letter"
        )
    return name


def check_index(index: int) -> int:
    if not 0 <= index <= MAX_INDEX:
        raise SpecError(f"node index {index}: expected 0..{MAX_INDEX} (one /24 per index)")
    return index


def check_domain(domain: str) -> str:
    d = domain.strip().lower().rstrip(".")
    if not d or "." not in d or not all(_LABEL.match(x) for x in d.split(".")):
        raise SpecError(f"base domain {domain!r}: expected a DNS name like lab.orama.test")
    return d


def stealth_host(namespace: str, base: str) -> str:
    """`cdn-<12 hex of sha256(namespace)>.<base>`: one label under the base, so `*.<base>`
    covers it, and the name does not say which namespace it serves."""
    return f"cdn-{hashlib.sha256(namespace.encode('utf-8')).hexdigest()[:12]}.{base}"


@dataclass(frozen=True)
class NodeSpec:
    name: str = DEFAULT_NAME
    index: int = 0
    base_domain: str = DEFAULT_BASE_DOMAIN
    namespace: str = DEFAULT_NAMESPACE
    # Caddy gets its certificates from the lab's ACME CA (pebble) instead of the lab CA.
    acme: bool = False

    def __post_init__(self) -> None:
        check_name(self.name)
        check_index(self.index)
        if check_domain(self.base_domain) != self.base_domain:
            raise SpecError(f"base domain {self.base_domain!r}: write it lowercased, no dot")
        if not self.namespace:
            raise SpecError("namespace must not be empty")

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.231.{SUBNET_BASE + self.index}.0/24")

    @property
    def host_address(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def address(self) -> str:
        return str(self.subnet.network_address + 2)

    @property
    def host_if(self) -> str:
        # Interface names are capped at 15 characters; the index alone keeps them unique.
        return f"olab{self.index}"

    @property
    def netns(self) -> str:
        return self.name

    @property
    def cdn_hosts(self) -> list[str]:
        if self.acme:
            # coturn serves one certificate (it has no SNI selection) and Caddy obtains one
            # per name, so an ACME node's TURN server can be right for one stealth name only.
            return [stealth_host(self.namespace, self.base_domain)]
        return [f"cdn.{self.base_domain}", stealth_host(self.namespace, self.base_domain)]

    @property
    def site_names(self) -> list[str]:
        return [self.base_domain, f"*.{self.base_domain}", self.address]


def hosts_file(spec: NodeSpec) -> str:
    names = " ".join([spec.base_domain, *spec.cdn_hosts])
    return (
        "127.0.0.1\tlocalhost\n"
        f"127.0.1.1\t{spec.name}\n"
        # No DNS on the node: its own public names resolve to its own address, as they
        # would through the real DNS on a production node.
        f"{spec.address}\t{names}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
    )


def caddyfile(spec: NodeSpec) -> str:
    """Caddy on :443/:80 as on an Orama node before the cutover, with lab CA certificates."""
    return f"""# Lab node {spec.name}: Caddy before the cutover (HTTPS on :443, HTTP on :80).
{{
\t# Certificates come from the lab CA: there is no ACME server to reach.
\tauto_https disable_certs
}}

{spec.base_domain}, *.{spec.base_domain} {{
\ttls {NODE_SITE_CERT} {NODE_SITE_KEY}
\trespond /health "ok" 200
\trespond "orama lab node {spec.name}: {{host}}" 200
}}
"""


def acme_caddyfile(spec: NodeSpec, directory_url: str, stealth_names: bool = True) -> str:
    """Caddy on :443/:80 obtaining every certificate from the lab's ACME CA, as a production
    node does from Let's Encrypt: the base name and each stealth name (so the TURN server
    has a certificate to take over at the cutover).

    `stealth_names=False` is the first boot's: the base name alone. Caddy 2.6 registers one
    ACME account per name it obtains at once while it has none stored, and saves them over
    each other in place, which can tear the account file (docs/cutover.md); a node that got
    its base name first, as real nodes do, has its account before the stealth names come."""
    cdn = ", ".join(spec.cdn_hosts)
    stealth = f"""
{cdn} {{
\trespond 404
}}
""" if stealth_names else ""
    return f"""# Lab node {spec.name}: Caddy before the cutover, certificates by ACME (lab pebble).
{{
\tacme_ca {directory_url}
\tacme_ca_root {NODE_CA_CERT}
}}

{spec.base_domain} {{
\trespond /health "ok" 200
\trespond "orama lab node {spec.name}: {{host}}" 200
}}
{stealth}"""


def turnserver_conf(spec: NodeSpec, secret: str) -> str:
    """coturn with TURN REST credentials, TLS on :5349 with the cdn certificate.

    After the cutover the router on :443 dials the TURN-TLS listener on the node address, not
    on 127.0.0.1: the TURN server reports the address it sees as the client's mapped address,
    and Firefox rejects a loopback one. 127.0.0.1 stays for local tools. Relays are allocated
    on the node address, where the host (the other end of the veth) can be a peer.
    """
    if not secret or any(c.isspace() for c in secret):
        raise SpecError("TURN secret must be non-empty and contain no whitespace")
    return f"""# Lab node {spec.name}: coturn before the cutover.
listening-port={TURN_PORT}
tls-listening-port={TURN_TLS_PORT}
listening-ip={spec.address}
listening-ip=127.0.0.1
relay-ip={spec.address}
min-port=49152
max-port=65535
realm={spec.base_domain}
use-auth-secret
static-auth-secret={secret}
fingerprint
cert={NODE_CDN_CERT}
pkey={NODE_CDN_KEY}
no-tlsv1
no-tlsv1_1
no-multicast-peers
no-cli
# syslog reaches journald at once (stdout is block-buffered); verbose logs each session's
# remote address, which the real-address tests read.
syslog
verbose
simple-log
"""


def coturn_default() -> str:
    # Older Debian init scripts refuse to start coturn unless this is set; harmless otherwise.
    return "TURNSERVER_ENABLED=1\n"


def ssh_config(spec: NodeSpec, key_file: str, known_hosts: str) -> str:
    return f"""Host {spec.name}
  HostName {spec.address}
  User root
  IdentityFile {key_file}
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking yes
  UserKnownHostsFile {known_hosts}
  ConnectTimeout 3
  LogLevel ERROR
"""


def known_hosts(spec: NodeSpec, host_pubkeys: list[str]) -> str:
    """Host keys read from the image, so the first connection is already verified."""
    lines = []
    for pub in host_pubkeys:
        parts = pub.split()
        if len(parts) >= 2:
            lines.append(f"{spec.name},{spec.address} {parts[0]} {parts[1]}\n")
    return "".join(lines)
