"""The install step's decisions that need no node: which unit changes a running router can take
by reload, and the install script's shell."""

from __future__ import annotations

import subprocess

from orama_stealth.deploy import scripts
from orama_stealth.deploy.ops.install import needs_new_process
from orama_stealth.deploy.render import router_unit
from orama_stealth.deploy.settings import settings_from_data


def _unit(**data: object) -> str:
    base = {"base_domain": "node.example.com", "tls_mode": "files",
            "tls_cert_file": "/etc/c.pem", "tls_key_file": "/etc/k.pem"}
    return router_unit(settings_from_data("n1", {**base, **data}))


def test_a_changed_reload_command_is_taken_by_reload() -> None:
    old = _unit()
    new = old.replace("ExecReload=", "ExecReload=/usr/bin/env ")
    assert new != old and needs_new_process(old, new) == []


def test_capabilities_and_limits_need_a_new_process() -> None:
    old = _unit()
    assert needs_new_process(old, _unit(turn_source="client", turn_tls_addr="192.0.2.1:5349")) \
        == ["AmbientCapabilities", "CapabilityBoundingSet"]
    limit = next(ln for ln in old.splitlines() if ln.startswith("LimitNOFILE="))
    assert needs_new_process(old, old.replace(limit, "LimitNOFILE=1234")) == ["LimitNOFILE"]


def test_install_script_is_valid_shell_and_restores_on_every_refusal() -> None:
    script = scripts.install_router("/var/lib/orama-stealth/wheels/abc", "pip-24.0.whl", "abc")
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    # pip, the new build's own check and the reload each end in the restore.
    assert script.count("refuse ") >= 4
    assert "systemctl restart" not in script
    assert "systemctl reload orama-sni-router.service" in script
