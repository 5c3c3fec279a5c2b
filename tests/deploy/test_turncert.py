"""The pure parts of the TURN certificate deploy: Caddy's storage paths, the reversible
turnserver.conf edit, the rendered units (checked by systemd-analyze), the inventory keys."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from orama_stealth.deploy import render, turncert, turnlisteners
from orama_stealth.deploy.caddysites import site_hosts
from orama_stealth.deploy.settings import SettingsError, settings_from_data
from orama_stealth.router.config import parse_config

CONF = """listening-port=3478
tls-listening-port=5349
cert=/etc/ssl/turn.crt
 pkey=/etc/ssl/turn.key
static-auth-secret=abc
"""


def _t(held: dict[str, int] | None = None, **data: object) -> turncert.TurnCertSettings:
    full: dict[str, object] = {"base_domain": "example.test", "tls_mode": "acme",
                               **data}
    s = settings_from_data("node-1", full)
    return turncert.turn_cert_settings(s, full, held)


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


def test_one_listener_per_name_ports_and_relay_slices() -> None:
    t = _t(namespaces=["team-b", "team-c"], cdn_hosts=["cdn.example.test"])
    assert t.plan is not None
    assert [(li.name, li.port, li.instance) for li in t.listeners] == [
        ("cdn.example.test", 5349, False),
        (t.names()[1], 5351, True), (t.names()[2], 5353, True)]
    # A namespace appended later keeps every earlier name on its port.
    more = _t(namespaces=["team-b", "team-c", "team-d"], cdn_hosts=["cdn.example.test"])
    assert [li.port for li in more.listeners][:3] == [5349, 5351, 5353]
    confs = turncert.node_confs(t, CONF)
    main = confs[t.conf]
    assert "min-port=49152\nmax-port=57343\n" in main
    assert turncert.original_conf(main) == CONF
    inst = confs[turncert.instance_conf_path(t.instances[0])]
    active = [ln for ln in inst.splitlines() if ln and not ln.startswith("#")]
    assert "static-auth-secret=abc" in active and "listening-port=3478" not in active
    assert {"tls-listening-port=5351", "alt-tls-listening-port=5352", "no-udp", "no-tcp",
            "no-dtls", "no-cli", "min-port=57344", "max-port=58367"} <= set(active)
    second = confs[turncert.instance_conf_path(t.instances[1])]
    assert "min-port=58368\nmax-port=59391\n" in second


def test_listener_settings_errors() -> None:
    with pytest.raises(SettingsError, match="turn_listener_slots: 2 cdn names"):
        _t(namespaces=["a", "b", "c"], turn_listener_slots=1)
    with pytest.raises(SettingsError, match="turn_listener_port"):
        _t(namespaces=["a", "b"], turn_listener_port=5348)
    with pytest.raises(SettingsError, match="turn_source: client"):
        _t(namespaces=["a", "b"], turn_source="client")
    with pytest.raises(SettingsError, match="too small"):
        turnlisteners.split_relay(60000, 60100, 8)
    # Without Caddy's certificates every name stays on the main TURN server.
    assert not _t(namespaces=["a", "b"], turn_cert_from_caddy=False).instances


def test_router_routes_point_each_name_at_its_listener() -> None:
    data = {"base_domain": "example.test", "tls_mode": "acme", "namespaces": ["a", "b"],
            "turn_tls_addr": "10.0.0.2:5349"}
    s = settings_from_data("node-1", data)
    ports = {li.name: li.port for li in turnlisteners.plan(s, data).instances}
    doc = yaml.safe_load(render.router_config(s, "", ports))
    assert [(r["match"], r["backend"]["name"], r["backend"]["addr"]) for r in doc["routes"]] == [
        (s.cdn_hosts[0], "turn-tls", "10.0.0.2:5349"),
        (s.cdn_hosts[1], "turn-tls-5351", "10.0.0.2:5351")]
    parse_config(render.router_config(s, "", ports), "sni-router.yaml")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_instance_unit_verifies(tmp_path: Path) -> None:
    t = _t(namespaces=["a", "b"])
    rendered = turncert.unit_files(t)
    script = rendered[turncert.SCRIPT][0]
    assert script.count("\nsync_one cdn") == 2
    path = tmp_path / "turn-cert-sync"
    path.write_text(script)
    assert subprocess.run(["sh", "-n", str(path)], check=False).returncode == 0
    unit = tmp_path / "orama-turn-tls@.service"
    unit.write_text(rendered[turncert.INSTANCE_TEMPLATE][0].replace("/usr/bin/turnserver",
                                                                     "/bin/true"))
    inst = tmp_path / "orama-turn-tls@cdn-x.example.test.service"
    inst.symlink_to(unit)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(inst)],
                          capture_output=True, text=True, timeout=60, check=False)
    problems = [line for line in proc.stderr.splitlines()
                if "orama-turn-tls" in line and "coturn.service" not in line
                and "User=" not in line]
    assert not problems, proc.stderr


def test_slots_stay_with_their_names() -> None:
    assign = turnlisteners.assign
    # A fresh node: inventory order, lowest slots first.
    assert assign(["b", "c", "d"], {}, 5351, 8) == {"b": 0, "c": 1, "d": 2}
    # c removed from the middle: b and d keep their slots, c's is free.
    assert assign(["b", "d"], {"b": 5351, "c": 5353, "d": 5355}, 5351, 8) == {"b": 0, "d": 2}
    # A new name takes the lowest free slot (c's old one), wherever it sits in the list.
    assert assign(["e", "b", "d"], {"b": 5351, "d": 5355}, 5351, 8) == {"e": 1, "b": 0, "d": 2}
    # Ports outside the slots (another turn_listener_port, fewer slots, odd offsets) and a
    # second claim of one slot are not kept: those names move to free slots.
    assert assign(["b", "d"], {"b": 6001, "d": 5366}, 5351, 8) == {"b": 0, "d": 1}
    assert assign(["b", "d"], {"b": 5365}, 5351, 4) == {"b": 0, "d": 1}
    assert assign(["b", "d"], {"b": 5353, "d": 5353}, 5351, 8) == {"b": 1, "d": 0}


def test_removing_a_namespace_keeps_the_others_ports_and_relay_slices() -> None:
    names = ["team-b", "team-c", "team-d"]
    t = _t(namespaces=names, cdn_hosts=["cdn.example.test"])
    held = {li.name: li.port for li in t.instances}
    before = turncert.node_confs(t, CONF)
    fewer = _t(held=held, namespaces=["team-b", "team-d"], cdn_hosts=["cdn.example.test"])
    assert [(li.port, li.slot) for li in fewer.instances] == [(5351, 0), (5355, 2)]
    after = turncert.node_confs(fewer, CONF)
    # The remaining instances' configs are unchanged, so the deploy does not restart them.
    for li in fewer.instances:
        path = turncert.instance_conf_path(li)
        assert after[path] == before[path]
    assert after[t.conf] == before[t.conf]
    assert "min-port=59392\nmax-port=60415\n" in after[turncert.instance_conf_path(
        fewer.instances[1])]
    # A namespace added afterwards takes the freed slot, its port and its relay slice.
    again = _t(held={li.name: li.port for li in fewer.instances},
               namespaces=["team-b", "team-d", "team-e"], cdn_hosts=["cdn.example.test"])
    assert [(li.port, li.slot) for li in again.instances] == [(5351, 0), (5355, 2), (5353, 1)]
    new = turncert.node_confs(again, CONF)[turncert.instance_conf_path(again.instances[2])]
    assert "tls-listening-port=5353\n" in new and "min-port=58368\nmax-port=59391\n" in new
    # The router's routes follow the same plan.
    data = {"base_domain": "example.test", "tls_mode": "acme", "cdn_hosts": ["cdn.example.test"],
            "namespaces": ["team-b", "team-d"], "turn_tls_addr": "10.0.0.2:5349"}
    s = settings_from_data("node-1", data)
    ports = {li.name: li.port for li in turnlisteners.plan(s, data, held).instances}
    routes = yaml.safe_load(render.router_config(s, "", ports))["routes"]
    assert [r["backend"]["addr"] for r in routes][1:] == ["10.0.0.2:5351", "10.0.0.2:5355"]


def test_held_ports_fact_reads_the_instance_configs(tmp_path: Path) -> None:
    for name, text in (("a.test", "x=1\ntls-listening-port=5351\nalt-tls-listening-port=5352\n"),
                       ("b.test", "tls-listening-port=5357\n"), ("c.test", "no port\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "turnserver.conf").write_text(text)
    (tmp_path / "d.test").mkdir()  # a directory without a config holds no port
    (tmp_path / "a.test" / "turnserver.conf.new").write_text("tls-listening-port=6000\n")
    command = turnlisteners.ListenerPortsFact().command().replace(turnlisteners.TLS_DIR,
                                                                   str(tmp_path))
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=10,
                         check=True).stdout.splitlines()
    held = turnlisteners.ListenerPortsFact().process(out)
    assert held.complete and held.ports == {"a.test": 5351, "b.test": 5357}
    empty = subprocess.run(["sh", "-c", command.replace(str(tmp_path), str(tmp_path / "no"))],
                           capture_output=True, text=True, timeout=10, check=True).stdout
    assert turnlisteners.parse_held(empty.splitlines()) == turnlisteners.HeldPorts({}, True)
    # A read cut short frees nothing: the deploy refuses it (ops/common.py: held_ports).
    assert not turnlisteners.parse_held(out[:1]).complete
