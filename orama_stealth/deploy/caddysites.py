"""Which host names an operator's Caddyfile already serves as sites.

The cutover adds a site per stealth name so Caddy holds its certificate; when the operator
already has a site for that name (a node whose Caddy obtained the stealth certificates before
the cutover), a second one would make Caddy refuse the file ("ambiguous site definition").
"""

from __future__ import annotations

import re

_SCHEME = re.compile(r"^[a-z]+://")


def _host(address: str) -> str:
    addr = _SCHEME.sub("", address.strip().lower())
    addr = addr.split("/", 1)[0]
    if addr.startswith("["):
        return addr.split("]", 1)[0] + "]"
    return addr.rsplit(":", 1)[0] if addr.count(":") == 1 else addr


def site_hosts(caddyfile: str) -> set[str]:
    """Host names of the top-level site blocks (snippets, the global block and named
    matchers are not sites). Comments and quoted braces are ignored."""
    hosts: set[str] = set()
    depth = 0
    for raw in caddyfile.split("\n"):
        line = re.sub(r'"(?:[^"\\]|\\.)*"', '""', raw)
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not line:
            continue
        if depth == 0 and line.endswith("{") and line != "{" and not line.startswith("("):
            for word in re.split(r"[,\s]+", line[:-1]):
                if word:
                    hosts.add(_host(word))
        depth += line.count("{") - line.count("}")
        depth = max(depth, 0)
    return hosts
