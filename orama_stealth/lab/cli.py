"""`orama-stealth lab up|down|status|ssh|build|clean`: the lab node from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from orama_stealth.lab import image, measure, nodeconf
from orama_stealth.lab.acme import AcmeError
from orama_stealth.lab.node import (
    DEFAULT_STATE_DIR,
    LabError,
    LabNode,
    recorded,
    recorded_index,
)
from orama_stealth.lab.nspawn import NspawnError


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _node(args: argparse.Namespace) -> LabNode:
    state = Path(args.dir)
    # status/down/ssh find the node as its last `up` made it; `up` takes only what it is given.
    rec = recorded(args.name, state) if args.lab_command != "up" else {}
    index = args.index if args.index is not None else rec.get("index", 0)
    base = getattr(args, "base_domain", None) or rec.get("base_domain")
    namespace = getattr(args, "namespace", None) or rec.get("namespace")
    acme = bool(getattr(args, "acme", False) or rec.get("acme"))
    return LabNode(
        args.name, index if isinstance(index, int) else 0, state,
        base_domain=base if isinstance(base, str) else nodeconf.DEFAULT_BASE_DOMAIN,
        namespace=namespace if isinstance(namespace, str) else nodeconf.DEFAULT_NAMESPACE,
        acme=acme,
        apt_sources=Path(args.apt_sources) if getattr(args, "apt_sources", None) else None,
        log=_err,
    )


Handler = Callable[[argparse.Namespace], int]
# One boot at a time: nodes booted at once here sometimes came up 'degraded'
# (systemd-tmpfiles-setup failed), and one boot takes only 2-4 s.
UP_PARALLEL = 1


def _guard(fn: Handler) -> Handler:
    """Expected failures become one clear line and exit 1, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            code: int = fn(args)
        except (LabError, image.ImageError, nodeconf.SpecError, NspawnError, AcmeError,
                OSError) as e:
            _err(f"orama-stealth lab {args.lab_command}: error: {e}")
            return 1
        return code

    return run


def fleet_names(name: str, count: int) -> list[str]:
    """One node keeps the name; N nodes are <name>-1 .. <name>-N (the first is the canary)."""
    if count < 1:
        raise nodeconf.SpecError(f"--count {count}: expected at least 1")
    return [name] if count == 1 else [f"{name}-{i}" for i in range(1, count + 1)]


def _group_file(state: Path, name: str) -> Path:
    return state / "groups" / f"{name}.json"


def group_members(state: Path, name: str) -> list[str]:
    """The nodes the last `up --name NAME` booted (just NAME when it booted one)."""
    try:
        names = json.loads(_group_file(state, name).read_text(encoding="utf-8"))["nodes"]
    except (OSError, ValueError, KeyError, TypeError):
        return [name]
    return [str(n) for n in names] if isinstance(names, list) and names else [name]


def _fleet(args: argparse.Namespace, names: list[str]) -> list[LabNode]:
    nodes = []
    for i, member in enumerate(names):
        one = argparse.Namespace(**vars(args))
        one.name = member
        if args.lab_command == "up":
            one.index = (args.index or 0) + i
            if len(names) > 1:
                # Each node of a fleet has its own names, as production nodes do.
                one.base_domain = f"{member}.{args.base_domain}"
        nodes.append(_node(one))
    return nodes


def cmd_up(args: argparse.Namespace) -> int:
    names = fleet_names(args.name, args.count)
    nodes = _fleet(args, names)
    with ThreadPoolExecutor(max_workers=min(len(nodes), UP_PARALLEL)) as pool:
        futures = [pool.submit(node.up) for node in nodes]
        errors = [e for f in futures if (e := f.exception()) is not None]
    group = _group_file(Path(args.dir), args.name)
    group.parent.mkdir(parents=True, exist_ok=True)
    group.write_text(json.dumps({"nodes": names}) + "\n", encoding="utf-8")
    if errors:
        for node in nodes:
            node.down(quiet=True)
        raise errors[0]
    timings = [f.result() for f in futures]
    if args.json:
        docs = [{**n.status(), "timings": t} for n, t in zip(nodes, timings, strict=True)]
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    else:
        for node in nodes:
            st = node.status()
            print(f"{st['name']} is up at {st['address']} "
                  f"(ssh -F {st['ssh_config']} {st['name']})")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    state = Path(args.dir)
    names = group_members(state, args.name) if args.all else [args.name]
    for node in _fleet(args, names):
        node.down()
    if args.all:
        _group_file(state, args.name).unlink(missing_ok=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.all:
        nodes = _fleet(args, group_members(Path(args.dir), args.name))
        docs = [n.status() for n in nodes]
        if args.json:
            print(json.dumps(docs, indent=2))
        else:
            for st in docs:
                print(f"{st['name']}: {'running' if st['running'] else 'stopped'} "
                      f"at {st['address']} ({st['base_domain']})")
        return 0 if all(st["running"] for st in docs) or not args.check else 3
    node = _node(args)
    st = node.status()
    if args.memory and isinstance(st["pid"], int):
        st["memory"] = measure.pss_kib(st["pid"])
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    for key in ("name", "running", "address", "ssh_config", "base_domain", "cdn_hosts",
                "ca_file", "turn_secret_file", "memory"):
        if key in st:
            print(f"{key}: {st[key]}")
    if st["running"]:
        proc = node.ssh("systemctl is-system-running; systemctl is-active caddy coturn", timeout=20)
        print("systemd/caddy/coturn: " + " ".join(proc.stdout.split()))
    return 0 if st["running"] or not args.check else 3


def cmd_ssh(args: argparse.Namespace) -> int:
    node = _node(args)
    words = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    # Like ssh itself: the words are joined and the node's shell parses them.
    argv = node.ssh_argv(" ".join(words))
    if not words:
        argv.insert(1, "-t")
    os.execvp(argv[0], argv)


def _running_nodes(state: Path) -> list[str]:
    nodes_dir = state / "nodes"
    if not nodes_dir.is_dir():
        return []
    return [
        d.name for d in sorted(nodes_dir.iterdir())
        if d.is_dir() and LabNode(d.name, recorded_index(d.name, state) or 0, state).pid()
    ]


def cmd_build(args: argparse.Namespace) -> int:
    state = Path(args.dir)
    busy = _running_nodes(state) if args.force else []
    if busy:
        # Their overlays use the cached tree as lower layer: it must not change under them.
        _err(f"orama-stealth lab build: error: nodes running on the cached image: "
             f"{', '.join(busy)}; run `down` for them before --force")
        return 1
    img = image.ensure_image(
        state / "cache", Path(args.apt_sources) if args.apt_sources else None,
        force=args.force, log=_err,
    )
    print(json.dumps({"rootfs": str(img.rootfs), **img.info}, indent=2))
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    state = Path(args.dir)
    _node(args).down()
    busy = _running_nodes(state)
    if busy:
        _err(f"orama-stealth lab clean: error: nodes still running on the cached image: "
             f"{', '.join(busy)}; run `down` for them first")
        return 1
    for p in image.remove_images(state / "cache"):
        _err(f"event=lab_clean removed={p}")
    return 0


def register(sub: Any) -> None:
    """Add `lab` and its subcommands; each sets `handler=callable(args) -> int`."""
    lab = sub.add_parser(
        "lab", help="a real systemd+sshd+Caddy+coturn test node (systemd-nspawn, needs root)",
        description="A Debian 12 node booted with systemd-nspawn in its own network namespace, "
        "in the before-cutover state of an Orama node.",
    )
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", default=nodeconf.DEFAULT_NAME,
                       help="node name: hostname, netns and machine name (default %(default)s)")
        p.add_argument("--dir", default=str(DEFAULT_STATE_DIR),
                       help="state dir: image cache, keys, CA, per-node files "
                       "(default %(default)s, or $ORAMA_LAB_DIR)")
        p.add_argument("--index", type=int, default=None,
                       help=f"0..{nodeconf.MAX_INDEX}: node gets 10.231.(77+N).2/24, host end "
                       "olabN; default 0 for up, the recorded one otherwise")

    def apt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--apt-sources", default=None,
                       help="apt sources file for the image (default: the host's)")

    up = lab_sub.add_parser("up", help="boot a fresh node in the before-cutover state")
    common(up)
    apt(up)
    up.add_argument("--base-domain", default=nodeconf.DEFAULT_BASE_DOMAIN)
    up.add_argument("--namespace", default=nodeconf.DEFAULT_NAMESPACE,
                    help="namespace whose hashed cdn name gets a certificate")
    up.add_argument("--acme", action="store_true",
                    help="Caddy obtains its certificates from a real ACME CA (pebble on the "
                    "host end of the link) for the base and the stealth name")
    up.add_argument("--json", action="store_true", help="print status and timings as JSON")
    up.add_argument("--count", type=int, default=1,
                    help="boot N nodes <name>-1..<name>-N at indexes --index..--index+N-1, "
                    "each with base domain <node>.<base-domain> (default 1: just <name>)")
    up.set_defaults(handler=_guard(cmd_up))

    down = lab_sub.add_parser("down", help="stop the node; remove netns, veth, mounts, overlay")
    common(down)
    down.add_argument("--all", action="store_true",
                      help="every node the last `up --name NAME --count N` booted")
    down.set_defaults(handler=_guard(cmd_down))

    status = lab_sub.add_parser("status", help="where the node is and how to reach it")
    common(status)
    status.add_argument("--json", action="store_true", help="machine-readable (the interface)")
    status.add_argument("--all", action="store_true",
                        help="every node the last `up --name NAME` booted, as a list (what "
                        "inventories/lab.py reads: the first is the canary, the rest the fleet)")
    status.add_argument("--check", action="store_true", help="exit 3 when not running")
    status.add_argument("--memory", action="store_true",
                        help="add PSS/RSS of the node's process tree (KiB)")
    status.set_defaults(handler=_guard(cmd_status))

    ssh = lab_sub.add_parser("ssh", help="ssh into the node, or run CMD there")
    common(ssh)
    ssh.add_argument("cmd", nargs=argparse.REMAINDER, help="command to run on the node")
    ssh.set_defaults(handler=_guard(cmd_ssh))

    build = lab_sub.add_parser("build", help="build (or reuse) the cached root filesystem")
    common(build)
    apt(build)
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(handler=_guard(cmd_build))

    clean = lab_sub.add_parser("clean", help="down the node and delete the cached images")
    common(clean)
    clean.set_defaults(handler=_guard(cmd_clean))
