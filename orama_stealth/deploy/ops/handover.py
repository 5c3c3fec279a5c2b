"""Stage the handover files (Caddy's config on both port pairs, the redirect rules) the switch
and the rollback run with; deploy/handover.py says how they are used."""

from __future__ import annotations

from orama_stealth.deploy import handover, layout, render
from orama_stealth.deploy.ops.common import read_text, run, say, settings, stage
from orama_stealth.deploy.ops.preflight import AS_CADDY
from orama_stealth.deploy.settings import NodeSettings


def _stage(caddyfile_on_node: str, https_extra: int, http_extra: int, s: NodeSettings) -> bool:
    """Adapt a Caddyfile on the node as Caddy's user, add the other port pair, stage it and
    the redirect to Caddy's new ports. False (said why) when it cannot: the scripts then fall
    back to a switch with a short refusal window."""
    ok, out = run(f"{AS_CADDY} caddy adapt --adapter caddyfile --config {caddyfile_on_node} "
                  "2>/dev/null")
    if not ok:
        say(f"handover: `caddy adapt {caddyfile_on_node}` failed, switching without it: {out}",
            error=True)
        return False
    try:
        dual = handover.dual_config(out, https_extra, http_extra)
    except handover.HandoverError as exc:
        say(f"handover: {exc}; switching without it", error=True)
        return False
    stage(dual, handover.DUAL_JSON.rsplit("/", 1)[1])
    stage(handover.redirect_rules(s.caddy_https_port, s.caddy_http_port),
          handover.REDIRECT_RULES.rsplit("/", 1)[1])
    return True


def stage_for_cutover() -> bool:
    """The installed new Caddyfile, also on :443/:80."""
    s = settings()
    return _stage(s.caddyfile, 443, 80, s)


def stage_for_rollback() -> bool:
    """The Caddyfile rollback restores (the backup's, or the current one with the managed
    blocks stripped), also on Caddy's cutover ports."""
    s = settings()
    text = read_text(f"{layout.BACKUP_POINTER}/Caddyfile") or render.strip_managed(
        read_text(s.caddyfile))
    if not text.strip():
        return False
    staged = stage(text, handover.RESTORED_CADDYFILE.rsplit("/", 1)[1])
    return _stage(staged, s.caddy_https_port, s.caddy_http_port, s)
