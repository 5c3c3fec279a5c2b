"""The one schema of `sni-router.yaml`: parsing, defaults and strict validation.

Every error names the file, the line and the key, so an operator can fix a rejected file without
guessing; a rejected file never replaces the running configuration (the caller keeps the old one).
The seed format of the guide loads unchanged; everything added is optional with a safe default.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, replace

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

DEFAULT_LISTEN = ":443"
DEFAULT_CLIENT_HELLO_TIMEOUT = 5.0
DEFAULT_BACKEND_DIAL_TIMEOUT = 5.0
# Long enough for TURN (permissions refresh every 5 minutes) and quiet WebSockets.
DEFAULT_IDLE_TIMEOUT = 600.0
DEFAULT_DRAIN_TIMEOUT = 30.0
# Once one side has sent FIN, a peer that never closes its own side must not pin the connection
# (and a drain) for the whole idle timeout: HAProxy's client-fin/server-fin, one key for both.
DEFAULT_HALF_CLOSE_TIMEOUT = 30.0
DEFAULT_MAX_CONCURRENT_CONNS = 10000
# Off by default: a fixed per-address cap punishes users behind carrier-grade NAT.
DEFAULT_MAX_CONNS_PER_IP = 0
PROXY_VERSIONS = ("v1", "v2")
NON_TLS_ACTIONS = ("drop", "fallback")
LISTENER_MODES = ("tls", "tcp")
MAIN_LISTENER = "https"


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    addr: str
    host: str
    port: int
    proxy_protocol: str | None = None
    source: str = "router"  # "client": dial from the client's address (router/transparent.py)


@dataclass(frozen=True, slots=True)
class Route:
    match: str
    backend: Backend
    line: int


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    addr: str
    host: str  # "" means every address, dual-stack
    port: int
    mode: str
    backend: Backend | None


@dataclass(frozen=True, slots=True)
class RouterConfig:
    path: str
    listeners: tuple[Listener, ...]
    client_hello_timeout: float
    backend_dial_timeout: float
    idle_timeout: float
    drain_timeout: float
    half_close_timeout: float
    max_concurrent_conns: int
    max_conns_per_ip: int
    non_tls: str
    fallback: Backend
    routes: tuple[Route, ...]
    workers: int
    metrics_listen: tuple[str, int] | None

    def with_runtime_of(self, running: RouterConfig) -> RouterConfig:
        """This (reloaded) config with the parts that need a restart kept as `running` has
        them: the listener set, the worker count and the metrics address."""
        return replace(
            self, listeners=running.listeners, workers=running.workers,
            metrics_listen=running.metrics_listen,
        )


class ConfigError(Exception):
    """A config file was rejected. str() is `FILE:LINE: KEY: message`."""

    def __init__(self, path: str, line: int | None, key: str, message: str) -> None:
        self.path, self.line, self.key, self.message = path, line, key, message
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


# --- YAML with line numbers -------------------------------------------------------------------

_scalar_loader = yaml.SafeLoader("")


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


class _Doc:
    """Walks the composed YAML tree so every value keeps the line it came from."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, node: Node | None, key: str, message: str) -> ConfigError:
        return ConfigError(self.path, _line(node) if node is not None else None, key, message)

    def mapping(
        self, node: Node, key: str, allowed: tuple[str, ...]
    ) -> dict[str, tuple[Node, Node]]:
        if not isinstance(node, MappingNode):
            raise self.fail(node, key, f"expected a mapping, got {_kind(node)}")
        out: dict[str, tuple[Node, Node]] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, ScalarNode):
                raise self.fail(knode, key, "expected a plain key")
            name = str(knode.value)
            full = f"{key}.{name}" if key else name
            if name in out:
                first = _line(out[name][0])
                raise self.fail(knode, full, f"duplicate key (first set on line {first})")
            if name not in allowed:
                raise self.fail(knode, full, f"unknown key; expected one of: {', '.join(allowed)}")
            out[name] = (knode, vnode)
        return out

    def scalar(self, node: Node, key: str) -> object:
        if not isinstance(node, ScalarNode):
            raise self.fail(node, key, f"expected a single value, got {_kind(node)}")
        return _scalar_loader.construct_object(node)

    def string(self, node: Node, key: str) -> str:
        value = self.scalar(node, key)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(node, key, f"expected a non-empty string, got {value!r}")
        return value.strip()

    def integer(self, node: Node, key: str, minimum: int, maximum: int) -> int:
        value = self.scalar(node, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(node, key, f"expected a whole number, got {value!r}")
        if not minimum <= value <= maximum:
            raise self.fail(node, key, f"expected {minimum}..{maximum}, got {value}")
        return value

    def duration(self, node: Node, key: str, allow_zero: bool = False) -> float:
        value = self.scalar(node, key)
        seconds = parse_duration(value)
        if seconds is None:
            raise self.fail(
                node, key, f"expected a duration like 5s, 250ms, 1m30s or seconds, got {value!r}"
            )
        if seconds < 0 or (seconds == 0 and not allow_zero):
            raise self.fail(node, key, f"expected a positive duration, got {value!r}")
        return seconds

    def choice(self, node: Node, key: str, options: tuple[str, ...]) -> str:
        value = self.scalar(node, key)
        if value not in options:
            raise self.fail(node, key, f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return repr(node.value)


# --- values -----------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float | None:
    """Go-style durations ("5s", "1m30s", "250ms") or a plain number of seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    return total if pos == len(text) and pos > 0 else None


_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def split_hostport(text: str) -> tuple[str, int] | None:
    """`host:port`, `[v6]:port` or `:port` (every address); None when malformed."""
    if text.startswith("["):
        end = text.find("]:")
        if end < 0:
            return None
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            return None
        if host and not _valid_host(host):
            return None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return None
    return host, int(port_text)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return valid_hostname(host)


def valid_hostname(name: str) -> bool:
    name = name.rstrip(".").lower() if name.endswith(".") else name.lower()
    return 0 < len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


def normalize_match(pattern: str) -> str | None:
    """Lowercased route pattern: an exact host name or `*.` plus a suffix; None when invalid."""
    p = pattern.strip().lower()
    if p.endswith("."):
        p = p[:-1]
    if p.startswith("*."):
        return p if "*" not in p[2:] and valid_hostname(p[2:]) else None
    return p if "*" not in p and valid_hostname(p) else None


# --- the schema -------------------------------------------------------------------------------

TOP_KEYS = (
    "listen",
    "half_close_timeout",
    "client_hello_timeout",
    "backend_dial_timeout",
    "idle_timeout",
    "drain_timeout",
    "max_concurrent_conns",
    "max_conns_per_ip",
    "non_tls",
    "workers",
    "metrics_listen",
    "fallback",
    "routes",
    "listeners",
)
BACKEND_KEYS = ("name", "addr", "proxy_protocol", "source")
ROUTE_KEYS = ("match", "backend")
LISTENER_KEYS = ("name", "listen", "mode", "backend")


def parse_config(text: str, path: str = "<string>") -> RouterConfig:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = int(mark.line) + 1 if mark is not None else None
        raise ConfigError(path, line, "", f"not valid YAML: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(path, None, "", f"not valid YAML: {e}") from None
    if root is None:
        raise ConfigError(path, None, "", "the file is empty; expected at least `fallback`")
    return _Schema(_Doc(path)).config(root)


def read_config(path: str | os.PathLike[str]) -> tuple[str, RouterConfig]:
    """The file's text and the config it holds (the text is what a reload hands the workers)."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(name, None, "", f"cannot read: {e}") from None
    return text, parse_config(text, name)


def load_config(path: str | os.PathLike[str]) -> RouterConfig:
    return read_config(path)[1]


class _Schema:
    def __init__(self, doc: _Doc) -> None:
        self.doc = doc
        # One name means one address, so counters and logs by backend name stay unambiguous.
        self.backends: dict[str, tuple[Backend, int]] = {}

    def config(self, root: Node) -> RouterConfig:
        d = self.doc
        top = d.mapping(root, "", TOP_KEYS)

        if "fallback" not in top:
            raise d.fail(root, "fallback", "missing; expected {name, addr} of the default backend")
        fallback = self.backend(top["fallback"][1], "fallback")
        routes = self.routes(top["routes"][1]) if "routes" in top else ()

        main_node = top["listen"][1] if "listen" in top else root
        listen_text = d.string(main_node, "listen") if "listen" in top else DEFAULT_LISTEN
        listeners = [
            self.listener_addr(main_node, "listen", MAIN_LISTENER, listen_text, "tls", None)
        ]
        if "listeners" in top:
            listeners.extend(self.listeners(top["listeners"][1]))

        metrics: tuple[str, int] | None = None
        if "metrics_listen" in top:
            node = top["metrics_listen"][1]
            if self.doc.scalar(node, "metrics_listen") is not None:
                metrics = self.loopback_addr(node, "metrics_listen")

        seen: dict[tuple[str, int], str] = {}
        for li in listeners:
            other = seen.get((li.host, li.port))
            if other is not None:
                raise d.fail(
                    main_node, li.name, f"listeners {other!r} and {li.name!r} both use {li.addr}"
                )
            seen[(li.host, li.port)] = li.name

        def duration(key: str, default: float, allow_zero: bool = False) -> float:
            return d.duration(top[key][1], key, allow_zero) if key in top else default

        def integer(key: str, default: int, lo: int, hi: int) -> int:
            return d.integer(top[key][1], key, lo, hi) if key in top else default

        return RouterConfig(
            path=d.path,
            listeners=tuple(listeners),
            client_hello_timeout=duration("client_hello_timeout", DEFAULT_CLIENT_HELLO_TIMEOUT),
            backend_dial_timeout=duration("backend_dial_timeout", DEFAULT_BACKEND_DIAL_TIMEOUT),
            idle_timeout=self.idle_timeout(top),
            drain_timeout=duration("drain_timeout", DEFAULT_DRAIN_TIMEOUT, allow_zero=True),
            half_close_timeout=duration("half_close_timeout", DEFAULT_HALF_CLOSE_TIMEOUT),
            max_concurrent_conns=integer(
                "max_concurrent_conns", DEFAULT_MAX_CONCURRENT_CONNS, 1, 1_000_000
            ),
            max_conns_per_ip=integer("max_conns_per_ip", DEFAULT_MAX_CONNS_PER_IP, 0, 1_000_000),
            non_tls=d.choice(top["non_tls"][1], "non_tls", NON_TLS_ACTIONS)
            if "non_tls" in top
            else "drop",
            fallback=fallback,
            routes=routes,
            workers=integer("workers", 0, 0, 256),
            metrics_listen=metrics,
        )

    def idle_timeout(self, top: dict[str, tuple[Node, Node]]) -> float:
        if "idle_timeout" not in top:
            return DEFAULT_IDLE_TIMEOUT
        node = top["idle_timeout"][1]
        seconds = self.doc.duration(node, "idle_timeout", allow_zero=True)
        if seconds == 0:
            # A peer that vanishes without a reset (powered off, its network cut) is seen by
            # nothing else: with no limit its connection and two descriptors would stay forever.
            raise self.doc.fail(
                node, "idle_timeout",
                "0 (never) is not allowed: a client that vanishes without a reset would hold "
                "its connection forever; use a long duration instead, e.g. 24h",
            )
        return seconds

    def backend(self, node: Node, key: str) -> Backend:
        d = self.doc
        fields = d.mapping(node, key, BACKEND_KEYS)
        for required in ("name", "addr"):
            if required not in fields:
                raise d.fail(node, f"{key}.{required}", "missing")
        name = d.string(fields["name"][1], f"{key}.name")
        addr_node = fields["addr"][1]
        addr = d.string(addr_node, f"{key}.addr")
        hostport = split_hostport(addr)
        if hostport is None or not hostport[0]:
            raise d.fail(addr_node, f"{key}.addr", f"expected host:port, got {addr!r}")
        proxy: str | None = None
        if "proxy_protocol" in fields:
            pnode = fields["proxy_protocol"][1]
            value = d.scalar(pnode, f"{key}.proxy_protocol")
            if value is not None and value is not False and value != "none":
                proxy = d.choice(pnode, f"{key}.proxy_protocol", PROXY_VERSIONS)
        source = "router"
        if "source" in fields:
            source = d.choice(fields["source"][1], f"{key}.source", ("router", "client"))
        backend = Backend(name, addr, hostport[0], hostport[1], proxy, source)
        seen = self.backends.get(name)
        if seen is not None and seen[0] != backend:
            raise d.fail(
                fields["name"][1],
                f"{key}.name",
                f"backend {name!r} is defined differently on line {seen[1]}"
                f" ({seen[0].addr}, proxy_protocol={seen[0].proxy_protocol});"
                " one name, one backend",
            )
        self.backends.setdefault(name, (backend, _line(node)))
        return backend

    def routes(self, node: Node) -> tuple[Route, ...]:
        d = self.doc
        if isinstance(node, ScalarNode) and d.scalar(node, "routes") is None:
            return ()
        if not isinstance(node, SequenceNode):
            raise d.fail(
                node, "routes", f"expected a list of {{match, backend}}, got {_kind(node)}"
            )
        out: list[Route] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(node.value):
            key = f"routes[{i}]"
            fields = d.mapping(item, key, ROUTE_KEYS)
            for required in ROUTE_KEYS:
                if required not in fields:
                    raise d.fail(item, f"{key}.{required}", "missing")
            mnode = fields["match"][1]
            raw = d.string(mnode, f"{key}.match")
            match = normalize_match(raw)
            if match is None:
                raise d.fail(
                    mnode,
                    f"{key}.match",
                    f"expected a host name or *.suffix (one leading wildcard label), got {raw!r}",
                )
            if match in seen:
                raise d.fail(
                    mnode, f"{key}.match", f"duplicate route {match!r} (also on line {seen[match]})"
                )
            seen[match] = _line(mnode)
            out.append(
                Route(match, self.backend(fields["backend"][1], f"{key}.backend"), _line(mnode))
            )
        return tuple(out)

    def listeners(self, node: Node) -> list[Listener]:
        d = self.doc
        if not isinstance(node, SequenceNode):
            raise d.fail(node, "listeners", f"expected a list, got {_kind(node)}")
        out: list[Listener] = []
        names = {MAIN_LISTENER}
        for i, item in enumerate(node.value):
            key = f"listeners[{i}]"
            fields = d.mapping(item, key, LISTENER_KEYS)
            for required in ("name", "listen"):
                if required not in fields:
                    raise d.fail(item, f"{key}.{required}", "missing")
            name = d.string(fields["name"][1], f"{key}.name")
            if name in names:
                raise d.fail(fields["name"][1], f"{key}.name", f"duplicate listener name {name!r}")
            names.add(name)
            mode = (
                d.choice(fields["mode"][1], f"{key}.mode", LISTENER_MODES)
                if "mode" in fields
                else "tcp"
            )
            backend = None
            if mode == "tcp":
                if "backend" not in fields:
                    raise d.fail(
                        item, f"{key}.backend", "missing; a tcp listener forwards to one backend"
                    )
                backend = self.backend(fields["backend"][1], f"{key}.backend")
            elif "backend" in fields:
                raise d.fail(
                    fields["backend"][0],
                    f"{key}.backend",
                    "a tls listener routes by SNI through `routes`;"
                    " remove backend or use mode: tcp",
                )
            lnode = fields["listen"][1]
            text = d.string(lnode, f"{key}.listen")
            out.append(self.listener_addr(lnode, f"{key}.listen", name, text, mode, backend))
        return out

    def listener_addr(
        self, node: Node, key: str, name: str, text: str, mode: str, backend: Backend | None
    ) -> Listener:
        hostport = split_hostport(text)
        if hostport is None:
            raise self.doc.fail(node, key, f'expected [host]:port such as ":443", got {text!r}')
        return Listener(name, text, hostport[0], hostport[1], mode, backend)

    def loopback_addr(self, node: Node, key: str) -> tuple[str, int]:
        text = self.doc.string(node, key)
        hostport = split_hostport(text)
        ok = hostport is not None and hostport[0] != ""
        if ok and hostport is not None and hostport[0] != "localhost":
            try:
                ok = ipaddress.ip_address(hostport[0]).is_loopback
            except ValueError:
                ok = False
        if not ok or hostport is None:
            raise self.doc.fail(
                node, key, f"expected a loopback host:port such as 127.0.0.1:9490, got {text!r}"
            )
        return ("127.0.0.1" if hostport[0] == "localhost" else hostport[0], hostport[1])
