"""The lab node: a real systemd + sshd + Caddy + coturn node, reached from the host as a
production node is reached from an operator's machine (SSH, TLS on :443, TURN-TLS on :5349)."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from support import lab as lab_fixtures

from orama_stealth import turn_secret
from orama_stealth.lab import image, nodeconf
from orama_stealth.lab.node import LabNode
from orama_stealth.lab.pki import TestCA
from orama_stealth.wire import stun, turn_auth

lab_node = lab_fixtures.lab_node
lab_nodes = lab_fixtures.lab_nodes
lab_fleet = lab_fixtures.lab_fleet

# ---- without a node -------------------------------------------------------------------------


def test_stealth_host_matches_the_credentials_module() -> None:
    for ns in ("myapp", "a", "Ünïcode-ns"):
        assert nodeconf.stealth_host(ns, "lab.orama.test") == turn_auth.stealth_host(
            ns, "lab.orama.test"
        )
    spec = nodeconf.NodeSpec()
    assert spec.cdn_hosts == ["cdn.lab.orama.test", "cdn-c1b70247946b.lab.orama.test"]


def test_spec_addresses_and_bad_input() -> None:
    spec = nodeconf.NodeSpec("n1", 3)
    assert (spec.host_address, spec.address) == ("10.231.80.1", "10.231.80.2")
    assert spec.host_if == "olab3"
    with pytest.raises(nodeconf.SpecError, match="node name 'Bad_Name'"):
        nodeconf.NodeSpec("Bad_Name")
    with pytest.raises(nodeconf.SpecError, match=r"node index 500: expected 0\.\.177"):
        nodeconf.NodeSpec("n", 500)
    with pytest.raises(nodeconf.SpecError, match="base domain 'not a domain'"):
        nodeconf.check_domain("not a domain")
    with pytest.raises(nodeconf.SpecError, match="TURN secret"):
        nodeconf.turnserver_conf(spec, "two words")


def test_recipe_hash_follows_the_recipe(tmp_path: Path) -> None:
    src = tmp_path / "sources"
    src.write_text("deb http://deb.debian.org/debian bookworm main\n")
    rec = image.recipe(src)
    same = image.recipe(src)
    assert image.recipe_hash(rec) == image.recipe_hash(same)
    changed = {**rec, "packages": [*rec["packages"], "nginx"]}
    assert image.recipe_hash(changed) != image.recipe_hash(rec)
    with pytest.raises(image.ImageError, match="cannot read apt sources"):
        image.recipe(tmp_path / "missing")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_removing_a_half_built_tree_unmounts_inside_it_first(tmp_path: Path) -> None:
    """A build killed mid-way leaves mounts in its tree; deleting through them could delete
    what they show (with /dev bound in, the host's device nodes)."""
    tree = tmp_path / "rootfs.tmp"
    inner = tree / "dev"
    inner.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
    try:
        (inner / "node").write_text("x")
        image.remove_tree(tree)
        assert not tree.exists()
        assert str(inner) not in Path("/proc/self/mountinfo").read_text()
    finally:
        subprocess.run(["umount", str(inner)], capture_output=True)


def test_saved_ca_issues_again(tmp_path: Path) -> None:
    ca = TestCA()
    ca.write_ca(tmp_path / "ca.crt")
    ca.write_key(tmp_path / "ca.key")
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    again = TestCA.load(tmp_path / "ca.crt", tmp_path / "ca.key")
    leaf = again.issue(["x.lab.orama.test"], tmp_path, "leaf")
    cert = x509.load_pem_x509_certificate(leaf.cert_file.read_bytes())
    cert.verify_directly_issued_by(ca.cert)
    other = TestCA()
    other.write_key(tmp_path / "other.key")
    with pytest.raises(ValueError, match="does not match"):
        TestCA.load(tmp_path / "ca.crt", tmp_path / "other.key")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orama_stealth.stealth_cli", "lab", *args],
        capture_output=True, text=True, timeout=60,
    )


def test_cli_rejects_bad_input_with_one_clear_line(tmp_path: Path) -> None:
    bad_index = _cli("status", "--index", "999", "--dir", str(tmp_path))
    assert bad_index.returncode == 1
    assert bad_index.stderr.strip() == (
        "orama-stealth lab status: error: node index 999: expected 0..177 (one /24 per index)"
    )
    bad_name = _cli("down", "--name", "Bad_Name", "--dir", str(tmp_path))
    assert bad_name.returncode == 1
    assert "node name 'Bad_Name': expected 1-20 characters" in bad_name.stderr
    assert "Traceback" not in bad_index.stderr + bad_name.stderr


def test_status_of_a_node_never_started(tmp_path: Path) -> None:
    out = _cli("status", "--json", "--name", "never", "--index", "7", "--dir", str(tmp_path))
    st = json.loads(out.stdout)
    assert (st["running"], st["pid"], st["address"]) == (False, None, "10.231.84.2")
    assert st["ssh_config"] == str(tmp_path / "nodes" / "never" / "ssh_config")
    assert _cli("status", "--check", "--name", "never", "--dir", str(tmp_path)).returncode == 3


# ---- with real nodes ------------------------------------------------------------------------


def _tls(host: str, port: int, sni: str, ca_file: str) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=ca_file)
    raw = socket.create_connection((host, port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=sni)


def _http(sock: socket.socket, host: str, path: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.lab
def test_up_gives_a_node_in_the_before_cutover_state(lab_node: LabNode) -> None:
    st = lab_node.status()
    assert st["running"] is True
    assert isinstance(st["pid"], int)

    # The CLI prints the same interface the fixtures use.
    out = subprocess.run(
        [sys.executable, "-m", "orama_stealth.stealth_cli", "lab", "status", "--json",
         "--name", lab_node.name, "--dir", st["state_dir"]],
        capture_output=True, text=True, check=True,
    ).stdout
    assert json.loads(out) == st

    # SSH by key with a pinned host key, the way pyinfra will reach it.
    assert lab_node.ssh("hostname", check=True).stdout.strip() == lab_node.name
    assert lab_node.ssh("systemctl is-system-running").stdout.strip() == "running"
    assert lab_node.ssh("systemctl --failed --no-legend --plain", check=True).stdout.strip() == ""
    assert lab_node.ssh("systemctl is-enabled caddy coturn").stdout.split() == ["enabled"] * 2
    # The node cannot reach the internet or a registry: only its own /24.
    routes = lab_node.ssh("ip -4 route show", check=True).stdout
    assert "default" not in routes
    # The deploy can make a venv for the router (python3-venv is in the image).
    venv = lab_node.ssh("python3 -m venv /tmp/v && /tmp/v/bin/python -m pip --version")
    assert venv.returncode == 0, venv.stderr

    addr, ca = str(st["address"]), str(st["ca_file"])
    base = str(st["base_domain"])
    with _tls(addr, 443, base, ca) as s:
        assert s.version() in ("TLSv1.2", "TLSv1.3")
        reply = _http(s, base, "/health")
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok")
    with _tls(addr, 443, base, ca) as s:
        assert f"orama lab node {lab_node.name}".encode() in _http(s, base, "/")

    for cdn in st["cdn_hosts"]:
        with _tls(addr, int(st["turn_tls_port"]), cdn, ca) as s:
            der = s.getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted(st["cdn_hosts"])

    with socket.create_connection((addr, 80), timeout=10) as s:
        reply = _http(s, base, "/some/path")
    head = reply.split(b"\r\n\r\n", 1)[0].decode()
    assert head.split()[1] in ("301", "308")
    assert f"Location: https://{base}/some/path" in head


def _turn_request(
    sock: ssl.SSLSocket, dec: stun.StreamDecoder, method: int,
    attrs: list[tuple[int, bytes]], key: bytes | None, txid: bytes | None = None,
) -> stun.Message:
    txid = txid or stun.new_transaction_id()
    sock.sendall(stun.encode(method, stun.MessageClass.REQUEST, txid, attrs,
                             integrity_key=key, fingerprint=True))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for m in dec.feed(sock.recv(4096)):
            if m.txid == txid:
                return m
    raise AssertionError(f"no answer to {stun.METHOD_NAMES[method]}")


@pytest.mark.lab
def test_turn_tls_relays_back_to_the_host(lab_node: LabNode) -> None:
    """A prober on the host allocates over TURN-TLS and is its own peer via the veth link."""
    st = lab_node.status()
    secret = turn_secret.read_secret(str(st["turn_secret_file"]))
    cred = turn_auth.rest_credential(secret, "labtest", now=time.time())
    host_ip = str(st["host_address"])
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind((host_ip, 0))
    peer.settimeout(10)
    cdn = st["cdn_hosts"][1]
    with peer, _tls(str(st["address"]), 5349, cdn, str(st["ca_file"])) as s:
        dec = stun.StreamDecoder()
        transport = [(stun.REQUESTED_TRANSPORT, stun.requested_transport())]
        first = _turn_request(s, dec, stun.ALLOCATE, transport, None)
        assert first.error is not None and first.error[0] == 401
        realm, nonce = first.get(stun.REALM), first.get(stun.NONCE)
        assert realm == str(st["turn_realm"]).encode() and nonce
        key = stun.long_term_key(cred.username, realm.decode(), cred.password)
        auth = [(stun.USERNAME, cred.username.encode()), (stun.REALM, realm), (stun.NONCE, nonce)]
        alloc = _turn_request(s, dec, stun.ALLOCATE, [*transport, *auth], key)
        assert alloc.cls == stun.MessageClass.SUCCESS, alloc.describe()
        relay = alloc.xor_address(stun.XOR_RELAYED_ADDRESS)
        assert relay is not None and relay[0] == st["address"]

        peer_addr = peer.getsockname()
        perm_txid = stun.new_transaction_id()
        perm = _turn_request(
            s, dec, stun.CREATE_PERMISSION,
            [stun.address_attr(stun.XOR_PEER_ADDRESS, peer_addr, perm_txid), *auth], key,
            perm_txid,
        )
        assert perm.cls == stun.MessageClass.SUCCESS, perm.describe()

        send_txid = stun.new_transaction_id()
        s.sendall(stun.encode(
            stun.SEND, stun.MessageClass.INDICATION, send_txid,
            [stun.address_attr(stun.XOR_PEER_ADDRESS, peer_addr, send_txid),
             (stun.DATA_ATTR, b"to the host")],
            fingerprint=True,
        ))
        data, src = peer.recvfrom(2048)
        assert (data, src) == (b"to the host", relay)

        peer.sendto(b"back to the prober", relay)
        got = None
        deadline = time.monotonic() + 10
        while got is None and time.monotonic() < deadline:
            for m in dec.feed(s.recv(4096)):
                if m.method == stun.DATA and m.cls == stun.MessageClass.INDICATION:
                    got = m.get(stun.DATA_ATTR)
        assert got == b"back to the prober"


def _leftovers(st: dict[str, object]) -> list[str]:
    name, host_if = str(st["name"]), str(st["host_if"])
    found = []
    if Path("/run/netns", name).exists():
        found.append(f"netns {name}")
    if subprocess.run(["ip", "link", "show", "dev", host_if], capture_output=True).returncode == 0:
        found.append(f"link {host_if}")
    node_dir = Path(str(st["state_dir"]), "nodes", name)
    mounts = Path("/proc/self/mountinfo").read_text()
    if str(node_dir) in mounts:
        found.append("overlay mount")
    if (node_dir / "boot").exists():
        found.append("overlay dir")
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"systemd-nspawn" in cmd and f"--machine={name}\0".encode() in cmd:
            found.append(f"nspawn pid {d.name}")
    return found


@pytest.mark.lab
def test_two_nodes_at_once_and_down_leaves_nothing(lab_nodes: Callable[..., LabNode]) -> None:
    a, b = lab_nodes(), lab_nodes(base_domain="edge.example.test", namespace="other")
    sa, sb = a.status(), b.status()
    assert sa["address"] != sb["address"]
    # The CLI finds b as its `up` made it, without being told the domain again.
    out = _cli("status", "--json", "--name", b.name, "--dir", str(sb["state_dir"])).stdout
    cli = json.loads(out)
    assert cli == sb
    assert cli["cdn_hosts"] == ["cdn.edge.example.test", "cdn-d9298a10d1b0.edge.example.test"]
    with _tls(str(sb["address"]), 443, "edge.example.test", str(sb["ca_file"])) as s:
        assert f"orama lab node {b.name}".encode() in _http(s, "edge.example.test", "/")
    assert a.ssh("hostname", check=True).stdout.strip() == a.name
    assert b.ssh("hostname", check=True).stdout.strip() == b.name
    # Each node is on its own link: a's address is not reachable from b.
    assert b.ssh(f"timeout 3 bash -c '</dev/tcp/{sa['address']}/22'").returncode != 0

    for node, st in ((a, sa), (b, sb)):
        assert _leftovers(st) != []
        result = node.down()
        assert result["nspawn"] == "halted"
        assert _leftovers(st) == []
        assert node.status()["running"] is False
        # Idempotent.
        assert node.down()["removed"] == []


def _booting(name: str, state_dir: str) -> bool:
    rec = Path(state_dir, "nodes", name, "node.json")
    try:
        return isinstance(json.loads(rec.read_text()).get("pid"), int)
    except (OSError, ValueError):
        return False


@pytest.mark.lab
@pytest.mark.parametrize("stage", ["network", "booting"])
def test_down_after_an_interrupted_up_leaves_nothing(
    lab_nodes: Callable[..., LabNode], stage: str
) -> None:
    """`up` killed (SIGKILL: no cleanup of its own) once the network exists, or once nspawn
    is booting; then `down` from a new process must remove everything."""
    # Borrow a slot through the factory's lock by starting and stopping one node first.
    node = lab_nodes()
    node.down()
    st = node.status()
    argv = [sys.executable, "-m", "orama_stealth.stealth_cli", "lab", "up", "--name", node.name,
            "--index", str(node.spec.index), "--dir", str(st["state_dir"])]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        def reached() -> bool:
            if stage == "network":
                return Path("/run/netns", node.name).exists()
            return _booting(node.name, str(st["state_dir"]))

        while not reached() and time.monotonic() < deadline:
            assert proc.poll() is None, "up finished before it could be interrupted"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    assert _leftovers(st) != []
    down = subprocess.run(
        [*argv[:4], "down", *argv[5:]], capture_output=True, text=True, timeout=120,
    )
    assert down.returncode == 0, down.stderr
    assert _leftovers(st) == []
    assert LabNode(node.name, node.spec.index, str(st["state_dir"])).status()["running"] is False


@pytest.mark.lab
def test_up_count_boots_a_fleet_and_the_inventory_lists_canary_and_fleet(
    lab_fleet: Callable[[int], list[LabNode]], tmp_path: Path
) -> None:
    # Borrow two slots through the fixture's locks, then boot them with the CLI.
    borrowed = lab_fleet(2)
    for node in borrowed:
        node.down()
    first, second = (n.spec.index for n in borrowed)
    if second != first + 1:
        pytest.skip(f"slots {first} and {second} are not consecutive (other runs hold slots)")
    state_dir = str(borrowed[0].status()["state_dir"])
    name = f"olt{first}g"
    common = ["--name", name, "--dir", state_dir]
    try:
        up = _cli("up", *common, "--index", str(first), "--count", "2")
        assert up.returncode == 0, up.stderr
        status = _cli("status", "--json", "--all", *common)
        docs = json.loads(status.stdout)
        assert [d["name"] for d in docs] == [f"{name}-1", f"{name}-2"]
        assert [d["index"] for d in docs] == [first, second]
        assert [d["base_domain"] for d in docs] == [f"{name}-1.lab.orama.test",
                                                   f"{name}-2.lab.orama.test"]
        assert all(d["running"] for d in docs)
        # The lab inventory: the first node is the canary, the others the fleet.
        path = tmp_path / "status.json"
        path.write_text(status.stdout)
        inv = subprocess.run(
            [sys.executable, "-c", "import json, runpy; g = runpy.run_path('inventories/lab.py');"
             " print(json.dumps({k: [h[0] for h in g.get(k, [])] for k in ('canary', 'fleet')}))"],
            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
            timeout=60, env={**os.environ, "ORAMA_LAB_STATUS": str(path)})
        assert inv.returncode == 0, inv.stderr
        assert json.loads(inv.stdout) == {"canary": [f"{name}-1"], "fleet": [f"{name}-2"]}
    finally:
        down = _cli("down", "--all", *common)
    assert down.returncode == 0, down.stderr
    for d in docs:
        assert _leftovers(d) == []
