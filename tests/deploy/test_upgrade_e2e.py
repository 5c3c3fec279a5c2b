"""Day two on a cut-over lab node, as the operator lives it: `systemctl reload`, and the cutover
re-run with a new build of the router (an upgrade), each under a client opening a new TLS
connection to :443 every 5 ms with five long-lived connections open; then an upgrade to a
build that cannot start, which must leave the old build serving and fail the step with the
router's reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from support.deploylab import REPO, Lab, build_wheel, changed

from orama_stealth.lab.clientloop import ClientLoop

pytestmark = [pytest.mark.lab, pytest.mark.slow]

ROUTER = "/opt/orama/bin/orama-sni-router"


def build_variant(tmp: Path, edit: str) -> Path:
    """A wheel built from a copy of this checkout whose router source differs by `edit`, a
    line appended to orama_stealth/router/__init__.py."""
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    with (src / "orama_stealth/router/__init__.py").open("a") as f:
        f.write(f"\n{edit}\n")
    return build_wheel(tmp / "wheel", src)


def with_wheel(lab: Lab, wheel: Path) -> Lab:
    return Lab(lab.node, lab.status, lab.status_file, wheel)


def main_pid(lab: Lab) -> str:
    return lab.ssh("systemctl show -p MainPID --value orama-sni-router").strip()


def running_build(lab: Lab) -> str:
    """The installed build, as the router's own --version reports it."""
    return lab.ssh(f"{ROUTER} --version").strip()


def measured(loop: ClientLoop, what: str) -> None:
    s = loop.summary()
    print(f"FIGURES {what}: {s.line()}")
    assert s.failed == 0, f"{what}: {s.line()}"
    assert s.slowest_handshake < 0.5, f"{what}: {s.line()}"


def _ts(line: str) -> datetime:
    stamp = next(f for f in line.split() if f.startswith("ts="))[3:]
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")


def old_workers_lived(lab: Lab, build: str, within: float = 45.0) -> float:
    """Seconds from the upgrade to build `build` until its last old worker exited, read from
    the router's journal (the old workers keep the connections they had until these end)."""
    deadline = time.monotonic() + within
    while True:
        lines = lab.ssh("journalctl -u orama-sni-router -o cat --no-pager").splitlines()
        up = max(i for i, line in enumerate(lines)
                 if "event=upgraded" in line and f"build={build}" in line)
        gone = [line for line in lines[up:] if "event=old_worker_exited" in line
                and "left=0" in line]
        if gone:
            return (_ts(gone[0]) - _ts(lines[up])).total_seconds()
        assert time.monotonic() < deadline, "old workers still alive:\n" + "\n".join(lines[up:])
        time.sleep(0.5)


def test_reload_and_upgrade_refuse_nothing_and_keep_open_connections(
        lab: Lab, tmp_path: Path) -> None:
    assert lab.deploy("cutover").returncode == 0
    pid = main_pid(lab)
    before = running_build(lab)
    ca = str(lab.status["ca_file"])

    with ClientLoop(lab.address, 443, lab.base, ca, long_lived=5, max_seconds=120) as loop:
        lab.ssh("systemctl reload orama-sni-router")
        assert loop.check_long_lived() == [""] * 5
    measured(loop, "reload")
    assert main_pid(lab) == pid

    new_wheel = build_variant(tmp_path / "new", "# a new build")
    with ClientLoop(lab.address, 443, lab.base, ca, long_lived=5, max_seconds=240) as loop:
        upgrade = with_wheel(lab, new_wheel).deploy("cutover")
        assert upgrade.returncode == 0
        assert loop.check_long_lived() == [""] * 5
    measured(loop, "upgrade")
    assert main_pid(lab) == pid, "the upgrade restarted the router instead of reloading it"
    after = running_build(lab)
    assert after != before
    build = after.split()[-1]
    status = json.loads(lab.ssh("cat /run/orama-sni-router/status.json"))
    assert status["ok"] is True and status["build"] == build and str(status["pid"]) == pid
    journal = lab.ssh("journalctl -u orama-sni-router -o cat --no-pager")
    assert "event=upgraded" in journal and f"build={build}" in journal, journal[-3000:]
    # The long-lived connections closed with the client loop: the old workers follow them.
    print(f"FIGURES upgrade: old workers lived {old_workers_lived(lab, build):.1f}s "
          "(until the long-lived connections they held were closed)")

    broken = build_variant(tmp_path / "broken", "def broken(:")
    with ClientLoop(lab.address, 443, lab.base, ca, max_seconds=240) as loop:
        failed = with_wheel(lab, broken).deploy("cutover")
    assert failed.returncode != 0
    assert "did not take build" in failed.stdout
    assert "SyntaxError" in failed.stdout, failed.stdout[-3000:]
    assert "the running router serves :443 on" in failed.stdout, failed.stdout[-1000:]
    measured(loop, "failed upgrade")
    assert main_pid(lab) == pid
    assert running_build(lab) == after, "the broken build was left installed"
    # The install's own check refused the build: the router was never asked to load it.
    status = json.loads(lab.ssh("cat /run/orama-sni-router/status.json"))
    assert status["build"] == build and str(status["pid"]) == pid
    served = lab.probe("--sni", lab.base, "--https", "--expect-server", "Caddy")
    assert served["ok"], served


# The last release before in-place upgrades (its router cannot re-execute itself).
PREVIOUS_RELEASE = "e648396"


def previous_release(tmp: Path) -> Path:
    """The previous release's tree (git archive of this repository), with the wheelhouse its
    deploy uploads."""
    if subprocess.run(["git", "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"], cwd=REPO,
                      capture_output=True, check=False).returncode != 0:
        pytest.skip(f"commit {PREVIOUS_RELEASE} is not in this clone's history")
    tree = tmp / "previous"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", PREVIOUS_RELEASE], cwd=REPO,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    (tree / "build").mkdir()
    shutil.copytree(REPO / "build" / "wheelhouse", tree / "build" / "wheelhouse")
    return tree


def test_upgrade_from_the_release_before_in_place_upgrades(lab: Lab, tmp_path: Path) -> None:
    """A node cut over by the previous release (its own deploy and router) is upgraded by the
    current cutover: its router is restarted once, with new connections sent to Caddy's ports
    meanwhile, and reloads in place from then on."""
    old = previous_release(tmp_path)
    old_wheel = build_wheel(tmp_path / "old-wheel", old)
    argv = [sys.executable, "-m", "pyinfra", "-y", "inventories/lab.py", "deploys/cutover.py",
            "--data", f"router_wheel={old_wheel}"]
    env = {**lab.env(), "PYTHONPATH": str(old)}
    first = subprocess.run(argv, cwd=old, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stdout[-3000:]
    assert lab.node.ssh("test -e /run/orama-sni-router/status.json").returncode != 0
    pid = main_pid(lab)
    caddy = lab.ssh("systemctl show -p MainPID --value caddy").strip()

    ca = str(lab.status["ca_file"])
    with ClientLoop(lab.address, 443, lab.base, ca, max_seconds=240) as loop:
        upgrade = lab.deploy("cutover")
    assert upgrade.returncode == 0, upgrade.stdout[-3000:]
    assert "predates in-place upgrades" in upgrade.stdout
    # Only the router restarts: the new drop-in is ordering, which needs no new Caddy.
    assert lab.ssh("systemctl show -p MainPID --value caddy").strip() == caddy
    measured(loop, "upgrade from the previous release")
    assert main_pid(lab) != pid
    status = json.loads(lab.ssh("cat /run/orama-sni-router/status.json"))
    assert status["ok"] is True and status["build"] == running_build(lab).split()[-1]
    assert "orama_stealth_handover" not in lab.ssh("nft list tables")
    again = lab.deploy("cutover")
    assert again.returncode == 0 and changed(again) == 0
