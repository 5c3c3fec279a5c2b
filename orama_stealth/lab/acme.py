"""A real ACME CA for a lab node: Debian's `pebble`, on the host end of the node's veth link.

pebble validates every challenge for real (HTTP-01 on the node's :80, TLS-ALPN-01 on its :443):
no `PEBBLE_VA_*` shortcut is set. Its VA resolves the lab names through
`pebble-challtestsrv`'s DNS server, which answers every A query with the node's address (and no
AAAA), so validation traffic goes to the node over its own veth and nowhere else.
`PEBBLE_AUTHZREUSE=0` makes pebble validate again for every order instead of reusing an earlier
authorization, so every certificate the tests see was proven by a challenge.

pebble's own HTTPS (directory and management) uses a certificate from the lab CA; the node
trusts it through Caddy's `acme_ca_root`. pebble's issuing root is random per start; it is
fetched from the management endpoint (`/roots/0`) into `roots.pem` beside the lab CA, which is
what the probes trust for an ACME node.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from orama_stealth.lab.pki import TestCA

DIR_PORT = 14000
MGMT_PORT = 15000
DNS_PORT = 8053
CHALLTEST_MGMT_PORT = 8055
START_WAIT = 15.0
# pebble's default certificate lifetime is years; a production-like one makes "days left"
# mean something in the probes.
VALIDITY_SECONDS = 90 * 86400


class AcmeError(RuntimeError):
    pass


@dataclass(frozen=True)
class AcmeCA:
    """Where a node's pebble listens and keeps its files."""

    host_address: str  # the host end of the lab link; pebble binds only there
    node_address: str  # every lab name resolves to this for pebble's VA
    work_dir: Path

    @property
    def directory_url(self) -> str:
        return f"https://{self.host_address}:{DIR_PORT}/dir"

    @property
    def roots_file(self) -> Path:
        """pebble's issuing root followed by the lab CA (what an ACME node's clients trust)."""
        return self.work_dir / "roots.pem"

    @property
    def pids_file(self) -> Path:
        return self.work_dir / "pids.json"

    def start(self, ca: TestCA) -> list[int]:
        """Start challtestsrv and pebble; return their PIDs once the directory answers."""
        self.stop()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tls = ca.issue([self.host_address], self.work_dir, "pebble-tls")
        config = {"pebble": {
            "listenAddress": f"{self.host_address}:{DIR_PORT}",
            "managementListenAddress": f"{self.host_address}:{MGMT_PORT}",
            "certificate": str(tls.cert_file),
            "privateKey": str(tls.key_file),
            "httpPort": 80,
            "tlsPort": 443,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            "certificateValidityPeriod": VALIDITY_SECONDS,
        }}
        conf = self.work_dir / "pebble-config.json"
        conf.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        dns = f"{self.host_address}:{DNS_PORT}"
        pids: list[int] = []
        try:
            pids.append(self._spawn("challtestsrv", [
                "pebble-challtestsrv", "-dns01", dns, "-http01", "", "-https01", "",
                "-tlsalpn01", "", "-management", f"{self.host_address}:{CHALLTEST_MGMT_PORT}",
                "-defaultIPv4", self.node_address, "-defaultIPv6", "",
            ]))
            env = {k: v for k, v in os.environ.items() if not k.startswith("PEBBLE_")}
            env["PEBBLE_AUTHZREUSE"] = "0"
            pids.append(self._spawn("pebble", ["pebble", "-config", str(conf),
                                               "-dnsserver", dns], env))
            self.pids_file.write_text(json.dumps(pids) + "\n", encoding="utf-8")
            self._wait_ready(ca)
        except BaseException:
            self.stop()
            raise
        return pids

    def _spawn(self, stem: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        log = open(self.work_dir / f"{stem}.log", "ab")  # noqa: SIM115 (the child keeps it)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as e:
            raise AcmeError(f"cannot start {argv[0]}: {e} (apt-get install pebble)") from e
        finally:
            log.close()
        return proc.pid

    def _context(self, ca: TestCA) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=ca.cert_pem.decode("ascii"))
        return ctx

    def _wait_ready(self, ca: TestCA) -> None:
        ctx = self._context(ca)
        deadline = time.monotonic() + START_WAIT
        last = ""
        while time.monotonic() < deadline:
            for pid in json.loads(self.pids_file.read_text(encoding="utf-8")):
                if not _alive(pid):
                    raise AcmeError(f"pebble/challtestsrv exited during start; logs in "
                                    f"{self.work_dir}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(self.directory_url, context=ctx, timeout=2) as r:
                    json.load(r)
                root_url = f"https://{self.host_address}:{MGMT_PORT}/roots/0"
                with urllib.request.urlopen(root_url, context=ctx, timeout=2) as r:
                    root = r.read()
            except OSError as e:
                last = str(e)
                time.sleep(0.1)
                continue
            self.roots_file.write_bytes(root.rstrip(b"\n") + b"\n" + ca.cert_pem)
            return
        raise AcmeError(f"pebble's directory {self.directory_url} did not answer within "
                        f"{START_WAIT:.0f}s (last: {last}); {self._log_tail()}")

    def _log_tail(self) -> str:
        parts = []
        for stem in ("challtestsrv", "pebble"):
            with contextlib.suppress(OSError):
                parts.append((self.work_dir / f"{stem}.log").read_text(errors="replace")[-800:])
        return "\n".join(parts)

    def stop(self) -> list[int]:
        """Stop the processes this node started (by recorded PID, checked by name)."""
        try:
            pids = json.loads(self.pids_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        stopped = []
        for pid in pids:
            if isinstance(pid, int) and _is_pebble(pid):
                os.kill(pid, signal.SIGTERM)
                stopped.append(pid)
        deadline = time.monotonic() + 5
        for pid in stopped:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            # When this process started them, reap them (a pytest run starts many nodes).
            with contextlib.suppress(ChildProcessError, OSError, TypeError):
                os.waitpid(pid, os.WNOHANG)
        self.pids_file.unlink(missing_ok=True)
        return stopped


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _is_pebble(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0]
    except OSError:
        return False
    return os.path.basename(argv0) in (b"pebble", b"pebble-challtestsrv") and _alive(pid)
