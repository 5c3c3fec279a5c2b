"""The pure parts of the TURN certificate deploy: Caddy's storage paths, the reversible
turnserver.conf edit, the rendered units (checked by systemd-analyze), the inventory keys."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from orama_stealth.deploy import turncert
from orama_stealth.deploy.caddysites import site_hosts
from orama_stealth.deploy.settings import SettingsError, settings_from_data

CONF = """listening-port=3478
tls-listening-port=5349
cert=/etc/ssl/turn.crt
 pkey=/etc/ssl/turn.key
static-auth-secret=abc
"""


def _t(**data: object) -> turncert.TurnCertSettings:
    full: dict[str, object] = {"base_domain": "example.test", "tls_mode": "acme",
                               **data}
    s = settings_from_data("node-1", full)
    return turncert.turn_cert_settings(s, full)


def test_issuer_key_matches_caddy_storage_layout() -> None:
    assert turncert.issuer_key("https://acme-v02.api.letsencrypt.org/directory") \
        == "acme-v02.api.letsencrypt.org-directory"
    # Seen on a lab node: Caddy 2.6 stored pebble's certificates under this directory.
    assert turncert.issuer_key("https://10.231.170.1:14000/dir") == "10.231.170.1-14000-dir"
    t = _t(acme_ca="https://10.231.170.1:14000/dir")
    assert t.name == "cdn.example.test" and t.managed
    assert t.caddy_file(t.name, "crt") == ("/var/lib/caddy/.local/share/caddy/certificates/"
                                           "10.231.170.1-14000-dir/cdn.example.test/"
                                           "cdn.example.test.crt")


def test_conf_edit_is_reversible_and_idempotent() -> None:
    managed = turncert.managed_conf(CONF)
    assert turncert.managed_conf(managed) == managed
    active = [line for line in managed.splitlines() if not line.startswith("#")]
    assert [line for line in active if "cert=" in line or "pkey=" in line] == [
        f"cert={turncert.CERT}", f"pkey={turncert.KEY}"]
    assert turncert.original_conf(managed) == CONF


def test_settings_errors() -> None:
    with pytest.raises(SettingsError, match=r"turn_cert_name: 'other\.test' is not one of"):
        _t(turn_cert_name="other.test")
    with pytest.raises(SettingsError, match="cert_min_days"):
        _t(cert_min_days="soon")
    with pytest.raises(SettingsError, match="turn_cert_from_caddy"):
        _t(turn_cert_from_caddy="yes")
    assert not _t(turn_cert_from_caddy=False).managed
    files = _t(tls_mode="files", tls_cert_file="/c", tls_key_file="/k")
    assert not files.managed


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_verify(tmp_path: Path) -> None:
    t = _t()
    rendered = turncert.unit_files(t)
    script = tmp_path / "turn-cert-sync"
    script.write_text(rendered[turncert.SCRIPT][0])
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    for path in turncert.UNITS:
        text = rendered[path][0].replace(turncert.SCRIPT, "/bin/true")
        (tmp_path / Path(path).name).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           *(str(tmp_path / Path(p).name) for p in turncert.UNITS)],
                          capture_output=True, text=True, timeout=60, check=False)
    problems = [line for line in proc.stderr.splitlines()
                if "orama-turn-cert" in line and "coturn.service" not in line]
    assert not problems, proc.stderr


def test_site_hosts() -> None:
    text = """{
\temail a@b.test
}
(snip) {
\trespond 1
}
# cdn.commented.test {
https://Cdn.Example.test:443, other.test {
\t@m host x.test
\trespond "{"
}
"""
    assert site_hosts(text) == {"cdn.example.test", "other.test"}
