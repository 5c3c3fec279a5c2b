"""The lab node as the deploy tests drive it: pyinfra runs of this checkout's deploys against
it (as the operator runs them), its listeners, the probe's JSON, and the wheels they install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def build_wheel(out: Path, src: Path = REPO) -> Path:
    """The orama-stealth wheel of the tree at `src`, built into `out`."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--disable-pip-version-check", "-w", str(out), str(src)],
                   check=True, timeout=300, capture_output=True)
    return next(out.glob("orama_stealth-*.whl"))


@dataclass
class Lab:
    node: Any
    status: dict[str, Any]
    status_file: Path
    wheel: Path

    @property
    def address(self) -> str:
        return str(self.status["address"])

    @property
    def base(self) -> str:
        return str(self.status["base_domain"])

    def ssh(self, command: str) -> str:
        return str(self.node.ssh(command, check=True).stdout)

    def deploy(self, deploy: str, *data: str, limit: str | None = None,
               env: dict[str, str] | None = None,
               timeout: float = 240) -> subprocess.CompletedProcess[str]:
        # pyinfra reports on stderr; one stream keeps the order an operator sees.
        proc = subprocess.run(self.argv(deploy, *data, limit=limit), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, env=self.env(env), check=False)
        print(f"--- pyinfra {deploy} {' '.join(data)} exit={proc.returncode}")
        print(proc.stdout[-3000:])
        return proc

    def argv(self, deploy: str, *data: str, limit: str | None = None) -> list[str]:
        argv = [sys.executable, "-m", "pyinfra", "-y", "inventories/lab.py",
                f"deploys/{deploy}.py", "--data", f"router_wheel={self.wheel}"]
        for d in data:
            argv += ["--data", d]
        return argv + (["--limit", limit] if limit else [])

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "ORAMA_LAB_STATUS": str(self.status_file), **(extra or {})}

    def listeners(self) -> dict[int, set[str]]:
        out: dict[int, set[str]] = {}
        for line in self.ssh("ss -ltnpH").splitlines():
            parts = line.split()
            port = int(parts[3].rsplit(":", 1)[1])
            out.setdefault(port, set()).update(
                p.split('"')[1] for p in parts[5].split("((")[1:] + parts[5].split("),(")[1:]
                if '"' in p)
        return out

    def probe(self, *args: str) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-m", "orama_stealth.stealth_cli", "probe", f"{self.address}:443",
             "--ca", str(self.status["ca_file"]), *args, "--json"],
            capture_output=True, text=True, timeout=60, check=False)
        report: dict[str, Any] = json.loads(proc.stdout)
        return report


def changed(proc: subprocess.CompletedProcess[str]) -> int:
    """The `Success` column of pyinfra's Grand total: operations that changed the node."""
    for line in proc.stdout.splitlines():
        if line.strip().startswith("Grand total"):
            success = line.split()[3]
            return 0 if success == "-" else int(success)
    raise AssertionError(f"no results table in:\n{proc.stdout[-2000:]}")


