"""Headless Debian chromium and firefox-esr driven by puppeteer-core (tests/browser/webrtc.mjs).

No browser is downloaded: the Debian executables are used. The lab CA is trusted through each
browser's own NSS database and names are mapped to the node inside the browser, so nothing on
the machine (/etc/hosts, the system trust store) changes.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BROWSER_DIR = Path(__file__).resolve().parents[1] / "browser"
DRIVER = BROWSER_DIR / "webrtc.mjs"
EXECUTABLES = {"chrome": "chromium", "firefox": "firefox-esr"}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
PAGE = b"<!doctype html><html><head><title>orama webrtc</title></head><body>ok</body></html>"


def missing() -> str | None:
    """Why the browser tests cannot run here (scripts/bootstrap.sh installs all of it)."""
    for tool in ("node", "certutil", *EXECUTABLES.values()):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/bootstrap.sh)"
    if not (BROWSER_DIR / "node_modules" / "puppeteer-core").is_dir():
        return "puppeteer-core is not installed in tests/browser (scripts/bootstrap.sh)"
    return None


def nss_db(directory: Path, ca_file: str) -> Path:
    """An NSS database in `directory` trusting `ca_file` for TLS servers (certutil -t C,,)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{directory}", "--empty-password"],
                   check=True, capture_output=True, timeout=30)
    subprocess.run(["certutil", "-A", "-d", f"sql:{directory}", "-n", "orama-lab-ca",
                    "-t", "C,,", "-i", ca_file], check=True, capture_output=True, timeout=30)
    return directory


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def page_server(address: str) -> Iterator[str]:
    """The test page on `address` (the host's end of the lab link: a page gathers candidates
    on the interface of the route to its own server, which must lead to the node)."""
    server = http.server.ThreadingHTTPServer((address, 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{address}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run(browser: str, work: Path, ca_file: str, node_address: str, names: list[str],
        url: str, scenarios: list[dict[str, Any]], timeout: float = 120) -> list[dict[str, Any]]:
    """One browser launch running every scenario; one result dict per scenario."""
    home = work / f"{browser}-home"
    profile = work / f"{browser}-profile"
    if browser == "chrome":
        nss_db(home / ".pki" / "nssdb", ca_file)
        profile.mkdir(parents=True)
        rules = ", ".join(f"MAP {n} {node_address}" for n in names)
        args = [*CHROMIUM_FLAGS, f"--host-resolver-rules={rules}"]
        prefs: dict[str, Any] = {}
    else:
        home.mkdir(parents=True)
        nss_db(profile, ca_file)  # the profile's cert9.db
        args = []
        prefs = {
            # Every name this profile resolves goes to the node (the page is an IP literal).
            "network.dns.forceResolve": node_address,
            "network.trr.mode": 5,
            "network.proxy.type": 0,
            "media.peerconnection.ice.obfuscate_host_addresses": False,
        }
    cfg = {"browser": browser, "executable": shutil.which(EXECUTABLES[browser]),
           "userDataDir": str(profile), "home": str(home), "args": args, "prefs": prefs,
           "url": url, "scenarios": scenarios}
    env = {**os.environ, "PUPPETEER_SKIP_DOWNLOAD": "1", "HOME": str(home)}
    proc = subprocess.run(["node", str(DRIVER), json.dumps(cfg)], cwd=BROWSER_DIR, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(results) != len(scenarios):
        raise AssertionError(f"{browser} driver exit {proc.returncode}: {proc.stderr[-3000:]}")
    return results


@functools.cache
def version(browser: str) -> str:
    out = subprocess.run([EXECUTABLES[browser], "--version"], capture_output=True, text=True,
                         timeout=30, check=False)
    return out.stdout.strip()
