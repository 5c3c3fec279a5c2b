"""`LabNode`: one Orama-like test node (systemd, sshd, Caddy, coturn) booted with nspawn.

Every `up` mounts a fresh overlay over the cached root filesystem, writes the node's own
files (SSH key, certificates, Caddyfile, turnserver.conf) into it, boots it inside its own
network namespace and returns only once Caddy and coturn are serving: the "before cutover"
state of a production node.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from orama_stealth.lab import acme, image, netns, nodeconf, nspawn
from orama_stealth.lab.acme import AcmeCA
from orama_stealth.lab.nodeconf import NodeSpec
from orama_stealth.lab.pki import TestCA

DEFAULT_STATE_DIR = Path(os.environ.get("ORAMA_LAB_DIR", "/var/tmp/orama-lab"))
# Short-lived lock around "is this index free? create its link", shared by every state dir.
NET_LOCK = Path("/run/lock/orama-lab-net.lock")
SSH_WAIT = 60.0
SYSTEMD_WAIT = 90.0
PORT_WAIT = 15.0
CERT_WAIT = 90.0
# Debian's caddy.service runs as caddy with HOME=/var/lib/caddy: Caddy's default storage.
CADDY_STORAGE = "/var/lib/caddy/.local/share/caddy"


class LabError(RuntimeError):
    pass


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class NodePaths:
    state_dir: Path
    name: str

    @property
    def key(self) -> Path:
        return self.state_dir / "id_ed25519"

    @property
    def ca_cert(self) -> Path:
        return self.state_dir / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.state_dir / "ca" / "ca.key"

    @property
    def cache(self) -> Path:
        return self.state_dir / "cache"

    @property
    def node_dir(self) -> Path:
        return self.state_dir / "nodes" / self.name

    @property
    def record(self) -> Path:
        return self.node_dir / "node.json"

    @property
    def ssh_config(self) -> Path:
        return self.node_dir / "ssh_config"

    @property
    def known_hosts(self) -> Path:
        return self.node_dir / "known_hosts"

    @property
    def turn_secret(self) -> Path:
        return self.node_dir / "turn_secret"

    @property
    def tls_dir(self) -> Path:
        return self.node_dir / "tls"

    @property
    def boot_dir(self) -> Path:
        return self.node_dir / "boot"

    @property
    def merged(self) -> Path:
        return self.boot_dir / "merged"

    @property
    def nspawn_log(self) -> Path:
        return self.node_dir / "nspawn.log"

    @property
    def acme_dir(self) -> Path:
        return self.node_dir / "acme"


def recorded(name: str, state_dir: Path = DEFAULT_STATE_DIR) -> dict[str, object]:
    """What the node's last `up` recorded (index, base_domain, namespace, pid, ...), so
    `status`/`down`/`ssh` need none of the options `up` was given. Empty if never up."""
    return _read_json(NodePaths(state_dir, name).record)


def recorded_index(name: str, state_dir: Path = DEFAULT_STATE_DIR) -> int | None:
    idx = recorded(name, state_dir).get("index")
    return idx if isinstance(idx, int) else None


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _run(argv: Sequence[str], what: str, timeout: float = 60.0) -> str:
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        raise LabError(f"{what}: {shlex.join(argv)} timed out after {timeout}s") from e
    if proc.returncode != 0:
        raise LabError(
            f"{what}: {shlex.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        )
    return proc.stdout


def _is_mounted(path: Path) -> bool:
    target = str(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            return any(line.split()[4] == target for line in f)
    except OSError:
        return False


def _ids(root: Path, user: str) -> tuple[int, int]:
    """uid/gid of a user inside the image (not the host's)."""
    for line in (root / "etc" / "passwd").read_text(encoding="utf-8").splitlines():
        parts = line.split(":")
        if len(parts) > 3 and parts[0] == user:
            return int(parts[2]), int(parts[3])
    raise LabError(f"{root}/etc/passwd: no user {user!r}; is the image's package list complete?")


class LabNode:
    """One lab node. `up`/`down` are idempotent and safe after a half-finished start."""

    def __init__(
        self,
        name: str = nodeconf.DEFAULT_NAME,
        index: int = 0,
        state_dir: Path | str = DEFAULT_STATE_DIR,
        *,
        base_domain: str = nodeconf.DEFAULT_BASE_DOMAIN,
        namespace: str = nodeconf.DEFAULT_NAMESPACE,
        acme: bool = False,
        apt_sources: Path | None = None,
        log: Callable[[str], None] = _say,
    ) -> None:
        self.spec = NodeSpec(name, index, nodeconf.check_domain(base_domain), namespace, acme)
        self.paths = NodePaths(Path(state_dir).absolute(), name)
        self.acme_ca = AcmeCA(self.spec.host_address, self.spec.address, self.paths.acme_dir)
        self.apt_sources = apt_sources
        self.log = log
        self._proc: subprocess.Popen[bytes] | None = None

    # ---- queries -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    def pid(self) -> int | None:
        pid = _read_json(self.paths.record).get("pid")
        if isinstance(pid, int) and nspawn.is_ours(pid, self.name):
            return pid
        return None

    def status(self) -> dict[str, object]:
        """The interface other tools read (inventories, tests): stable keys, plain values."""
        s, p = self.spec, self.paths
        pid = self.pid()
        return {
            "name": s.name,
            "index": s.index,
            "address": s.address,
            "host_address": s.host_address,
            "ssh_config": str(p.ssh_config),
            "ssh_host": s.name,
            "ssh_user": "root",
            "ssh_key": str(p.key),
            "known_hosts": str(p.known_hosts),
            "base_domain": s.base_domain,
            "namespace": s.namespace,
            "cdn_hosts": s.cdn_hosts,
            "ca_file": str(self.acme_ca.roots_file if s.acme else p.ca_cert),
            "turn_secret_file": str(p.turn_secret),
            "turn_port": nodeconf.TURN_PORT,
            "turn_tls_port": nodeconf.TURN_TLS_PORT,
            "turn_realm": s.base_domain,
            "node_files": {
                "site_cert": nodeconf.NODE_SITE_CERT,
                "site_key": nodeconf.NODE_SITE_KEY,
                "cdn_cert": nodeconf.NODE_CDN_CERT,
                "cdn_key": nodeconf.NODE_CDN_KEY,
                "ca_cert": nodeconf.NODE_CA_CERT,
                "turn_secret": nodeconf.NODE_TURN_SECRET,
                "caddyfile": "/etc/caddy/Caddyfile",
                "turnserver_conf": "/etc/turnserver.conf",
            },
            "host_if": s.host_if,
            "netns": s.netns,
            "state_dir": str(p.state_dir),
            "pid": pid,
            "running": pid is not None,
            "acme": self._acme_status() if s.acme else None,
        }

    def _acme_status(self) -> dict[str, object]:
        ca = self.acme_ca
        return {
            "directory": ca.directory_url,
            # On the node: what Caddy trusts for the directory's HTTPS (the lab CA).
            "directory_root": nodeconf.NODE_CA_CERT,
            "roots_file": str(ca.roots_file),
            "caddy_storage": CADDY_STORAGE,
            "cert_dir": self.caddy_cert_dir(),
        }

    def caddy_cert_dir(self) -> str:
        """Caddy's certificate directory for the lab CA (certmagic's issuer key: host-port
        and path of the directory URL)."""
        issuer = f"{self.spec.host_address}-{acme.DIR_PORT}-dir"
        return f"{CADDY_STORAGE}/certificates/{issuer}"

    def ssh_argv(self, command: str | Sequence[str] = ()) -> list[str]:
        cmd = command if isinstance(command, str) else shlex.join(command)
        argv = ["ssh", "-F", str(self.paths.ssh_config), self.name]
        return [*argv, "--", cmd] if cmd else argv

    def ssh(
        self, command: str | Sequence[str], *, check: bool = False, timeout: float = 120.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command on the node as root; a list is quoted for the remote shell."""
        proc = subprocess.run(
            self.ssh_argv(command), capture_output=True, text=True, timeout=timeout,
            input=input, stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise LabError(
                f"{self.name}: {command!r} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
            )
        return proc

    # ---- up ------------------------------------------------------------------------------

    def up(self) -> dict[str, float]:
        """Boot a fresh node in the before-cutover state; returns timings in seconds."""
        _require_tools()
        t0 = time.monotonic()
        img = self.prepare()
        t_img = time.monotonic()
        self.down(quiet=True)
        try:
            timings = self._boot_and_verify(img)
        except BaseException:
            self.log(f"event=lab_up_failed name={self.name} log={self.paths.nspawn_log}")
            with contextlib.suppress(Exception):
                self.down(quiet=True)
            raise
        timings["image"] = t_img - t0
        timings["total"] = time.monotonic() - t0
        self.log(
            f"event=lab_up name={self.name} address={self.spec.address} "
            f"pid={self.pid()} ssh_s={timings['ssh']:.2f} ready_s={timings['ready']:.2f} "
            f"total_s={timings['total']:.2f} ssh_config={self.paths.ssh_config}"
        )
        return timings

    def prepare(self) -> image.Image:
        """Shared state: SSH key, lab CA and the cached image (built on first use)."""
        p = self.paths
        p.node_dir.mkdir(parents=True, exist_ok=True)
        with image.file_lock(p.state_dir / "state.lock"):
            if not p.key.exists():
                _run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "orama-lab",
                     "-f", str(p.key)],
                    "creating the lab SSH key",
                )
            if not (p.ca_cert.exists() and p.ca_key.exists()):
                p.ca_cert.parent.mkdir(parents=True, exist_ok=True)
                ca = TestCA("orama-stealth lab CA")
                ca.write_key(p.ca_key)
                ca.write_ca(p.ca_cert)
        return image.ensure_image(p.cache, self.apt_sources, log=self.log)

    def _boot_and_verify(self, img: image.Image) -> dict[str, float]:
        s, p = self.spec, self.paths
        t0 = time.monotonic()
        # Recorded before anything is created, so `down` knows what to undo after a crash.
        self._write_record(img, None)
        p.boot_dir.mkdir(parents=True)
        for d in ("upper", "work", "merged"):
            (p.boot_dir / d).mkdir()
        _run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={img.rootfs},upperdir={p.boot_dir / 'upper'},"
             f"workdir={p.boot_dir / 'work'}",
             str(p.merged)],
            "mounting the node's overlay",
        )
        self._install_node_files()
        with image.file_lock(NET_LOCK):
            self._check_net_free()
            netns.create(s.netns, s.host_if, s.host_address, s.address, s.subnet.prefixlen)
        if s.acme:
            # Before the boot: Caddy asks the CA for certificates as soon as it starts.
            self.acme_ca.start(TestCA.load(p.ca_cert, p.ca_key))
        p.nspawn_log.write_bytes(b"")
        self._proc = nspawn.boot(p.merged, s.name, netns.NETNS_DIR / s.netns, p.nspawn_log)
        self._write_record(img, self._proc.pid)
        t_boot = time.monotonic()
        self._wait_ssh()
        t_ssh = time.monotonic()
        self._wait_running()
        self._verify_services()
        t_ready = time.monotonic()
        timings = {"prepare": t_boot - t0, "ssh": t_ssh - t_boot, "ready": t_ready - t_boot}
        if s.acme:
            self.wait_certificates([s.base_domain])
            full = nodeconf.acme_caddyfile(s, self.acme_ca.directory_url)
            self.ssh("cat > /etc/caddy/Caddyfile && systemctl reload caddy", input=full,
                     check=True)
            self.wait_certificates([s.base_domain, *s.cdn_hosts])
            timings["certificates"] = time.monotonic() - t_boot
        return timings

    def caddy_cert_file(self, name: str) -> str:
        return f"{self.caddy_cert_dir()}/{name}/{name}.crt"

    def wait_certificates(self, names: Sequence[str], timeout: float = CERT_WAIT) -> None:
        """Until Caddy has stored a certificate from the lab CA for every name."""
        test = " && ".join(f"test -s {shlex.quote(self.caddy_cert_file(n))}" for n in names)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ssh(test, timeout=20).returncode == 0:
                return
            time.sleep(0.5)
        logs = self.ssh("journalctl -u caddy --no-pager -n 15 -o cat").stdout
        raise LabError(f"{self.name}: Caddy has no ACME certificate for all of {list(names)} "
                       f"after {timeout:.0f}s; pebble logs in {self.acme_ca.work_dir}; "
                       f"caddy: {logs[-2500:]}")

    def _check_net_free(self) -> None:
        s = self.spec
        if netns.netns_exists(s.netns):
            raise LabError(
                f"network namespace {s.netns!r} exists and is not this node's: another lab "
                "node with the same --name? pick another name"
            )
        if netns.link_exists(s.host_if):
            raise LabError(
                f"interface {s.host_if} exists: index {s.index} is in use by another lab node; "
                "pick another --index"
            )
        users = netns.subnet_users(s.subnet)
        if users:
            raise LabError(
                f"{s.subnet} is already used by host interface(s) {', '.join(users)}; "
                "pick another --index"
            )

    def _install_node_files(self) -> None:
        s, p, root = self.spec, self.paths, self.paths.merged
        caddy = _ids(root, "caddy")
        turn = _ids(root, "turnserver")
        ca = TestCA.load(p.ca_cert, p.ca_key)
        site = ca.issue(s.site_names, p.tls_dir, "site")
        cdn = ca.issue(s.cdn_hosts, p.tls_dir, "cdn")
        if not p.turn_secret.exists():
            p.turn_secret.write_text(secrets.token_hex(24) + "\n", encoding="utf-8")
            p.turn_secret.chmod(0o600)
        secret = p.turn_secret.read_text(encoding="utf-8").strip()
        pub = p.key.with_suffix(".pub").read_text(encoding="utf-8")

        def put(rel: str, data: bytes | str, mode: int = 0o644, owner: tuple[int, int] = (0, 0),
                ) -> None:
            dest = root / rel.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)
            dest.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
            os.chown(dest, *owner)
            dest.chmod(mode)

        put("/etc/hostname", s.name + "\n")
        put("/etc/hosts", nodeconf.hosts_file(s))
        # Without it every SSH login logs a pam_env error and Python on the node runs in ASCII.
        put("/etc/default/locale", "LANG=C.UTF-8\n")
        (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
        put("/root/.ssh/authorized_keys", pub, 0o600)
        put(nodeconf.NODE_SITE_CERT, site.cert_file.read_bytes(), 0o644)
        put(nodeconf.NODE_SITE_KEY, site.key_file.read_bytes(), 0o640, (0, caddy[1]))
        put(nodeconf.NODE_CDN_CERT, cdn.cert_file.read_bytes(), 0o644)
        put(nodeconf.NODE_CDN_KEY, cdn.key_file.read_bytes(), 0o640, (0, turn[1]))
        put(nodeconf.NODE_TURN_SECRET, secret + "\n", 0o600)
        put("/etc/caddy/Caddyfile",
            nodeconf.acme_caddyfile(s, self.acme_ca.directory_url, stealth_names=False)
            if s.acme else nodeconf.caddyfile(s))
        put("/etc/turnserver.conf", nodeconf.turnserver_conf(s, secret), 0o640, (0, turn[1]))
        put("/etc/default/coturn", nodeconf.coturn_default())
        self._trust_ca(root)

        host_keys = [
            k.read_text(encoding="utf-8") for k in sorted((root / "etc/ssh").glob("ssh_host_*.pub"))
        ]
        p.known_hosts.write_text(nodeconf.known_hosts(s, host_keys), encoding="utf-8")
        p.ssh_config.write_text(
            nodeconf.ssh_config(s, str(p.key), str(p.known_hosts)), encoding="utf-8"
        )

    def _trust_ca(self, root: Path) -> None:
        """Make curl and Python on the node trust the lab CA, as a public CA is trusted in
        production. Writes what `update-ca-certificates` would (which takes ~2 s here)."""
        pem = self.paths.ca_cert.read_bytes()
        src = root / nodeconf.NODE_CA_CERT.lstrip("/")
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(pem)
        certs = root / "etc/ssl/certs"
        subject_hash = _run(
            ["chroot", str(root), "openssl", "x509", "-subject_hash", "-noout", "-in",
             nodeconf.NODE_CA_CERT],
            "hashing the lab CA's subject",
        ).strip()
        link = certs / "orama-lab-ca.pem"
        link.unlink(missing_ok=True)
        link.symlink_to(nodeconf.NODE_CA_CERT)
        hashed = certs / f"{subject_hash}.0"
        hashed.unlink(missing_ok=True)
        hashed.symlink_to("orama-lab-ca.pem")
        with open(certs / "ca-certificates.crt", "ab") as bundle:
            bundle.write(pem if pem.endswith(b"\n") else pem + b"\n")

    def _write_record(self, img: image.Image, pid: int | None) -> None:
        rec = {
            "name": self.name, "index": self.spec.index, "pid": pid,
            "host_if": self.spec.host_if, "netns": self.spec.netns,
            "base_domain": self.spec.base_domain, "namespace": self.spec.namespace,
            "acme": self.spec.acme,
            "rootfs": str(img.rootfs), "recipe_hash": img.recipe_hash,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.paths.record.write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")

    def _nspawn_tail(self) -> str:
        try:
            return self.paths.nspawn_log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def _wait_ssh(self) -> None:
        deadline = time.monotonic() + SSH_WAIT
        last = ""
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise LabError(
                    f"{self.name}: systemd-nspawn exited {self._proc.returncode} during boot; "
                    f"{self.paths.nspawn_log}:\n{self._nspawn_tail()}"
                )
            try:
                proc = self.ssh("true", timeout=10)
            except subprocess.TimeoutExpired:
                continue
            if proc.returncode == 0:
                return
            last = proc.stderr.strip()
            time.sleep(0.1)
        raise LabError(
            f"{self.name}: sshd on {self.spec.address} did not accept the lab key within "
            f"{SSH_WAIT:.0f}s (last: {last}); {self.paths.nspawn_log}:\n{self._nspawn_tail()}"
        )

    def _wait_running(self) -> None:
        proc = self.ssh(
            f"timeout {SYSTEMD_WAIT:.0f} systemctl is-system-running --wait",
            timeout=SYSTEMD_WAIT + 10,
        )
        state = proc.stdout.strip()
        if state != "running":
            failed = self.ssh("systemctl --failed --no-legend --plain").stdout.strip()
            raise LabError(
                f"{self.name}: systemd state is {state or 'unknown'!r}, expected 'running'; "
                f"failed units: {failed or 'none listed'}"
            )

    def _verify_services(self) -> None:
        proc = self.ssh("systemctl is-active caddy coturn")
        states = proc.stdout.split()
        if states != ["active", "active"]:
            logs = self.ssh("journalctl -u caddy -u coturn --no-pager -n 30").stdout
            raise LabError(f"{self.name}: caddy/coturn are {states}, expected active; {logs}")
        ports = [443, 80, nodeconf.TURN_TLS_PORT, nodeconf.TURN_PORT]
        deadline = time.monotonic() + PORT_WAIT
        pending = list(ports)
        while pending:
            port = pending[0]
            try:
                with socket.create_connection((self.spec.address, port), timeout=1.0):
                    pending.pop(0)
            except OSError as e:
                if time.monotonic() > deadline:
                    raise LabError(
                        f"{self.name}: nothing accepts on {self.spec.address}:{port} "
                        f"({e}) although caddy and coturn are active"
                    ) from None
                time.sleep(0.1)

    # ---- down ----------------------------------------------------------------------------

    def down(self, quiet: bool = False) -> dict[str, object]:
        """Stop the node by its nspawn PID and remove netns, veth, mounts and overlay."""
        t0 = time.monotonic()
        s, p = self.spec, self.paths
        rec = _read_json(p.record)
        how = "absent"
        pid = rec.get("pid")
        pids = [pid] if isinstance(pid, int) else nspawn.find(s.name, p.merged)
        for one in pids:
            how = nspawn.stop(one, s.name)
        removed: list[str] = [f"pebble:{pid}" for pid in self.acme_ca.stop()]
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
            self._proc = None
        if rec:
            # Only a namespace this state dir created is ours to delete.
            removed += netns.destroy(str(rec.get("netns") or s.netns), str(rec.get("host_if")))
        else:
            netns.unmount_netns_dir_if_empty()
        for _ in range(8):  # a mount may be stacked if an earlier start was interrupted
            if not _is_mounted(p.merged):
                break
            _run(["umount", str(p.merged)], f"unmounting {p.merged}")
            removed.append(f"mount:{p.merged}")
        if _is_mounted(p.merged):
            raise LabError(f"{p.merged} is still mounted after 8 umounts")
        if p.boot_dir.exists():
            image.remove_tree(p.boot_dir)
            removed.append(f"dir:{p.boot_dir}")
        shutil.rmtree(Path("/run/systemd/nspawn/propagate") / s.name, ignore_errors=True)
        if rec:
            rec.pop("pid", None)
            p.record.write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
        seconds = time.monotonic() - t0
        if not quiet or how != "absent" or removed:
            self.log(
                f"event=lab_down name={s.name} nspawn={how} seconds={seconds:.2f} "
                f"removed={','.join(removed) or 'nothing'}"
            )
        return {"nspawn": how, "removed": removed, "seconds": seconds}


def _require_tools() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab node needs root (network namespaces, mounts, nspawn)")
    missing = [t for t in ("systemd-nspawn", "ip", "ssh", "ssh-keygen", "mount", "chroot")
               if shutil.which(t) is None]
    if missing:
        raise LabError(
            f"missing tools: {', '.join(missing)} "
            "(apt-get install systemd-container iproute2 openssh-client)"
        )
