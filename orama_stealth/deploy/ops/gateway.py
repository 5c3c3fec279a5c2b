"""The optional gateway step: its stealth domain and its credentials ladder."""

from __future__ import annotations

from pyinfra.api.operation import operation

from orama_stealth.deploy.ops.common import Commands, executing, failure, guarded, say, settings


@operation()
@guarded
def gateway() -> Commands:
    """Tell the gateway the stealth domain and check its credentials list turns:<cdn>:443 last."""
    s = settings()
    if s.gateway_config is None or s.gateway_url is None:
        if executing():
            say("gateway: not configured for this host (gateway_config/gateway_url), skipped")
        return
    from orama_stealth.deploy.gateway import check_credentials, set_stealth_domain

    yield from set_stealth_domain(s)
    if executing():
        problem = check_credentials(s)
        if problem:
            yield failure(f"gateway: {problem}")
