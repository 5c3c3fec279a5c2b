"""The house's rules, read from the source with `ast`: what may import what.

- No import circle inside `orama_stealth` (a module's imports, at any depth, never lead back to it).
- `orama_stealth.wire` is sans-IO: the standard library's pure parts and `wire` itself only; no
  sockets, event loops, clocks, threads, processes or files.
- The router (`orama_stealth.router`) is what a node installs alone: it never imports the deploy,
  probe or lab code, nor their libraries (pyinfra, jinja2, httpx, cryptography).
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "orama_stealth"

# What wire/ may use from the standard library: data, text and arithmetic, nothing that touches
# the outside world or the time.
WIRE_STDLIB = {
    "__future__", "base64", "binascii", "collections", "dataclasses", "enum", "functools",
    "hashlib", "hmac", "ipaddress", "itertools", "re", "struct", "typing", "zlib", "abc",
    "secrets", "stringprep", "unicodedata",
}
ROUTER_FORBIDDEN = {"pyinfra", "jinja2", "httpx", "cryptography", "gevent", "paramiko"}
ROUTER_FORBIDDEN_OWN = ("orama_stealth.deploy", "orama_stealth.probe", "orama_stealth.lab")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def imports_of(name: str) -> frozenset[str]:
    """Every module `name` imports, at module level or inside functions (a lazy import still
    ties the two modules together), resolved to absolute names."""
    path = modules()[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            # `from pkg import mod` names a module when pkg.mod is one.
            for alias in node.names:
                if f"{mod}.{alias.name}" in modules():
                    found.add(f"{mod}.{alias.name}")
    return frozenset(found)


def own_imports(name: str) -> set[str]:
    mods = modules()
    return {m for m in imports_of(name) if m in mods and m != name and m != "orama_stealth"}


def test_the_rules_see_the_package() -> None:
    names = modules()
    assert "orama_stealth.wire.clienthello" in names
    assert "orama_stealth.router.config" in names
    # The walk must see real edges, or every rule below passes vacuously.
    assert "orama_stealth.router.config" in own_imports("orama_stealth.router.cli")
    assert "orama_stealth.wire.stun" in own_imports("orama_stealth.probe.turn_client")


def test_no_import_circle() -> None:
    graph = {name: own_imports(name) for name in modules()}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("name", sorted(n for n in modules() if n.startswith("orama_stealth.wire")))
def test_wire_is_sans_io(name: str) -> None:
    bad = []
    for mod in imports_of(name):
        top = mod.split(".")[0]
        if mod.startswith("orama_stealth.wire") or mod == "orama_stealth":
            continue
        if top == "orama_stealth" or top not in WIRE_STDLIB:
            bad.append(mod)
    assert not bad, f"{name} imports {sorted(bad)}: wire/ takes bytes and returns values only"


@pytest.mark.parametrize(
    "name", sorted(n for n in modules() if n.startswith("orama_stealth.router")))
def test_router_stands_alone(name: str) -> None:
    bad = sorted(
        m for m in imports_of(name)
        if m.split(".")[0] in ROUTER_FORBIDDEN or m.startswith(ROUTER_FORBIDDEN_OWN)
    )
    assert not bad, f"{name} imports {bad}: a node installs the router with pyyaml alone"


def test_wire_allowance_is_standard_library() -> None:
    assert set(sys.stdlib_module_names) | {"__future__"} >= WIRE_STDLIB
