"""A torn ACME account file on an ACME node (lab pebble): the cutover's preflight refuses the
node untouched and names the file and the fix; after the fix the cutover goes through.

The tear is made on the node the way Caddy 2.6 makes it (two in-place saves of different
lengths whose truncations both come before either write), from Caddy's own account."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
from support.deploylab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.slow]
STORAGE = "/var/lib/caddy/.local/share/caddy"
TEAR = r"""
import os, re, sys
path = sys.argv[1]
longer = open(path, 'rb').read()
acct = re.search(rb'my-account/([0-9a-f]+)', longer).group(1)
shorter = longer.replace(acct, acct[:-1])
a = os.open(path, os.O_WRONLY | os.O_TRUNC)
b = os.open(path, os.O_WRONLY | os.O_TRUNC)
os.write(a, longer)
os.write(b, shorter)
os.close(a)
os.close(b)
"""


@pytest.mark.timeout(900)
def test_preflight_names_a_torn_account_file(lab_nodes: Any, tmp_path: Path,
                                             release_wheel: Path) -> None:
    node = lab_nodes(acme=True)
    status = node.status()
    status_file = tmp_path / "lab-status.json"
    status_file.write_text(json.dumps(status))

    lab = Lab(node, status, status_file, release_wheel)
    ssh = lab.ssh

    account = ssh(f"ls {STORAGE}/acme/*/users/default/default.json").strip()
    ssh(f"python3 -c {shlex.quote(TEAR)} {account}")
    torn = ssh(f"cat {account}")
    assert torn.endswith('"\n}\n}'), torn[-20:]
    assert "Extra data" in str(node.ssh(f"python3 -m json.tool {account}", check=False).stderr)

    refused = lab.deploy("cutover", timeout=400)
    assert refused.returncode != 0
    assert f"Caddy's ACME account file {account} is not valid JSON" in refused.stdout
    assert "refused, untouched" in refused.stdout
    assert ssh("systemctl is-active orama-sni-router || true").strip() != "active"
    assert ssh("systemctl is-active caddy").strip() == "active"

    # The fix the message gives.
    key = account[:-len(".json")] + ".key"
    ssh(f"mv {account} {account}.broken && mv {key} {key}.broken && systemctl reload caddy")
    done = lab.deploy("cutover", timeout=400)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "cut over" in done.stdout
