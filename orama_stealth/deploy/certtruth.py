"""Verify step: for every stealth name, the certificate served through :443 is the one Caddy
currently holds for that name (read over SSH from Caddy's storage) and is not about to expire.

The probe runs as `orama-stealth probe --cert-truth` in a child process (see verify.py), so an
operator can re-run exactly the same check by hand; its JSON carries the days left.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

from pyinfra.api.command import FunctionCommand
from pyinfra.api.operation import operation
from pyinfra.context import host

from orama_stealth.deploy.facts import TextFile
from orama_stealth.deploy.settings import NodeSettings, settings_from_data
from orama_stealth.deploy.turncert import SERVICE, TurnCertSettings, turn_cert_settings
from orama_stealth.deploy.verify import Outcome, run_probe_cli

logger = logging.getLogger("orama_stealth.deploy")
Commands = Generator[Any, None, None]


def fix_for(name: str) -> str:
    return (f"on the node run `systemctl start {SERVICE}` (copies Caddy's certificate for "
            f"{name} to its TURN listener and sends it SIGUSR2), check that "
            f"`systemctl is-active orama-turn-cert.path` says active, or re-run "
            f"deploys/cutover.py")


def cert_truth(s: NodeSettings, t: TurnCertSettings, name: str, caddy_pem: str | None,
               workdir: Path) -> Outcome:
    label = f"certificate {name} via {s.probe_address}:443"
    trust = ["--ca", s.ca_file] if s.ca_file else []
    args = [f"{s.probe_address}:443", "--sni", name, *trust, "--cert-truth",
            "--cert-min-days", f"{t.min_days:g}"]
    if t.managed and name in t.names():
        if not caddy_pem:
            return Outcome(label, False, f"Caddy holds no certificate for {name} at "
                           f"{t.caddy_file(name, 'crt')} (journalctl -u caddy on the node)")
        expected = workdir / f"{name}.crt"
        expected.write_text(caddy_pem, encoding="utf-8")
        args += ["--expect-cert", str(expected), "--cert-fix", fix_for(name)]
    ok, detail = run_probe_cli(args)
    return Outcome(label, ok, detail)


def _fail(state: Any, host: Any, message: str) -> bool:
    del state
    host.log_styled(message, fg="red", log_func=logger.error)
    return False


@operation()
def certificate_truth() -> Commands:
    """Every cdn name: the served certificate is Caddy's current one, and not expiring."""
    if not host.state.is_executing:
        return
    s = settings_from_data(host.name, host.data)
    t = turn_cert_settings(s, host.data)
    failed = []
    with tempfile.TemporaryDirectory(prefix="orama-cert-truth-") as tmp:
        for name in s.cdn_hosts:
            # Identity is checked where the deploy gives the TURN server Caddy's certificate;
            # for every name the TLS check (chain, name) and the days left still apply.
            # A read that failed is "" (no certificate), never None (no identity check).
            pem = ((host.get_fact(TextFile, path=t.caddy_file(name, "crt"), _timeout=60) or "")
                   if t.managed and name in t.names() else None)
            o = cert_truth(s, t, name, pem, Path(tmp))
            host.log_styled(f"probe {'ok' if o.ok else 'FAILED'}: {o.probe}: {o.detail}",
                            fg="cyan" if o.ok else "red",
                            log_func=logger.warning if o.ok else logger.error)
            if not o.ok:
                failed.append(o)
    if failed:
        yield FunctionCommand(_fail, ("certificate truth failed: "
                                      + " | ".join(f"{o.probe}: {o.detail}" for o in failed),),
                              {})
