"""Keep operator routes in `sni-router.yaml` across cutover runs.

The router config has no include mechanism, so the deploy owns one file and merges: routes whose
match is listed on the file's `# managed-routes:` line are the deploy's and are regenerated; every
other route is the operator's and is carried over verbatim (as YAML), after the managed ones.
"""

from __future__ import annotations

from typing import Any

import yaml

MARK = "# managed-routes:"


class RouterConfigMergeError(ValueError):
    """The node's existing sni-router.yaml cannot be merged; the message names file and key."""


def managed_matches(text: str) -> set[str]:
    for line in text.splitlines():
        if line.startswith(MARK):
            return {m.lower() for m in line[len(MARK):].split()}
    return set()


def operator_routes(text: str, path: str, new_managed: set[str]) -> list[dict[str, Any]]:
    """Routes of the existing file that the deploy did not write.

    Without a managed-routes line the whole file is the operator's (a hand-written config from
    before this toolkit): its routes are kept unless they name a stealth host the deploy now
    manages, which the deploy's route replaces.
    """
    if not text.strip():
        return []
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RouterConfigMergeError(f"{path}: not valid YAML, fix or remove it: {exc}") from None
    if not isinstance(doc, dict):
        raise RouterConfigMergeError(f"{path}: expected a mapping at the top level")
    routes = doc.get("routes") or []
    if not isinstance(routes, list):
        raise RouterConfigMergeError(f"{path}: routes: expected a list")
    old_managed = managed_matches(text)
    kept: list[dict[str, Any]] = []
    for i, route in enumerate(routes):
        if not isinstance(route, dict) or not isinstance(route.get("match"), str):
            raise RouterConfigMergeError(f"{path}: routes[{i}]: expected a mapping with a match")
        match = route["match"].lower()
        if match in old_managed or match in new_managed:
            continue
        kept.append(route)
    return kept


def routes_yaml(routes: list[dict[str, Any]]) -> str:
    """The kept routes as list items under `routes:` (two-space indent, like the template)."""
    if not routes:
        return ""
    dumped = yaml.safe_dump(routes, default_flow_style=False, sort_keys=False)
    return "".join(f"  {line}\n" if line else "\n" for line in dumped.rstrip("\n").split("\n"))
