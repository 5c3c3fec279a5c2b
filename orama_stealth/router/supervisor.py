"""The supervisor: owns the listening sockets, forks the workers, and does the operations.

It binds every listener (or takes them from systemd socket activation), then forks N workers
that inherit them; the kernel spreads accepts over the workers. It restarts a worker that dies
(subtracting what that worker held from the shared admission table), re-reads the config on
SIGHUP and passes it to the workers, drains on SIGTERM, answers the systemd notify protocol and
serves /metrics by summing the workers' published counters.

It runs a plain `selectors` loop rather than asyncio, so forking a replacement worker never
happens inside a running event loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import resource
import selectors
import signal
import socket
import time
import traceback
from dataclasses import dataclass, field

from orama_stealth.router import sd
from orama_stealth.router.admission import LocalAdmission, SharedTable
from orama_stealth.router.config import ConfigError, Listener, RouterConfig, load_config
from orama_stealth.router.logs import Logger
from orama_stealth.router.metrics import StatsRegion, merge, render
from orama_stealth.router.routes import RouteTable
from orama_stealth.router.worker import MSG_HEADER, Worker

BACKLOG = 4096
RESTART_BACKOFF = 1.0
KILL_GRACE = 5.0
METRICS_CLIENT_TIMEOUT = 5.0


class BindError(Exception):
    pass


def _bind(listener: Listener, reuseport: bool = False) -> socket.socket:
    """Dual-stack for ":port" (IPv4 arrives as ::ffff:a.b.c.d), plain IPv4 where v6 is absent."""
    host, port = listener.host, listener.port
    candidates: list[tuple[int, tuple[str, int]]] = []
    if host == "":
        candidates = [(socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as e:
            raise BindError(f"listener {listener.name}: cannot resolve {host!r}: {e}") from None
        candidates = [(int(i[0]), (str(i[4][0]), port)) for i in infos[:1]]
    last: OSError | None = None
    for family, addr in candidates:
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and host == "":
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(addr)
            s.listen(BACKLOG)
            s.setblocking(False)
            return s
        except OSError as e:
            s.close()
            last = e
            # Only a missing IPv6 stack falls back to IPv4; a busy port is an error.
            if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                break
    raise BindError(f"listener {listener.name}: cannot listen on {listener.addr}: {last}")


def open_listeners(
    cfg: RouterConfig, inherited: list[tuple[str, socket.socket]], log: Logger, workers: int = 1
) -> list[tuple[Listener, list[socket.socket]]]:
    """Sockets per listener: one per worker when we bind, one shared when systemd passed it.

    Binding one SO_REUSEPORT socket per worker lets the kernel hand each new connection to
    exactly one worker; a single shared socket wakes every worker for every connection (only
    one wins the accept). Sockets from systemd are matched to listeners by name, else by order.
    """
    by_name = {name: s for name, s in inherited if name}
    known = {li.name for li in cfg.listeners}
    unnamed = [s for name, s in inherited if not name or name not in known]
    out: list[tuple[Listener, list[socket.socket]]] = []
    try:
        for i, li in enumerate(cfg.listeners):
            sock = by_name.pop(li.name, None)
            if sock is None and unnamed and i < len(inherited):
                sock = unnamed.pop(0)
            if sock is not None:
                sock.setblocking(False)
                socks = [sock]
                how = "inherited"
            elif workers > 1:
                socks = []
                out.append((li, socks))  # so a failure below closes what was bound
                for _ in range(workers):
                    socks.append(_bind(li, reuseport=True))
                out.pop()
                how = "bound"
            else:
                socks = [_bind(li)]
                how = "bound"
            for sock in socks:
                defer_accept(sock, li, cfg.client_hello_timeout)
            out.append((li, socks))
            log.info(
                "listening", "listener open", listener=li.name, addr=li.addr, mode=li.mode,
                socket=_sockname(socks[0]), how=how, sockets=len(socks),
            )
    except BaseException:
        for _li, socks in out:
            for s in socks:
                s.close()
        raise
    for s in [*by_name.values(), *unnamed]:
        log.warn("listen_fd_unused", "inherited socket matches no listener", socket=_sockname(s))
        s.close()
    return out


def defer_accept(sock: socket.socket, listener: Listener, seconds: float) -> None:
    """TLS clients speak first: let the kernel hand over a connection only once its hello (or
    any byte) arrived. The worker then reads the hello right after accept without registering
    with the loop or arming a timer, and connections that never speak cost nothing. Not for
    `mode: tcp` listeners, whose protocol may have the server speak first."""
    if listener.mode != "tls" or not hasattr(socket, "TCP_DEFER_ACCEPT"):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, max(1, int(seconds + 0.999)))


def _sockname(sock: socket.socket) -> str:
    try:
        addr = sock.getsockname()
    except OSError:
        return "?"
    return f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"


def usable_cpus() -> int:
    """CPUs this process may run on (a container or CPUAffinity= may allow fewer than exist)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _raise_nofile() -> None:
    """Two descriptors per routed connection: take the whole hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class WorkerSlot:
    index: int
    pid: int = 0
    control: socket.socket | None = None
    ready: bool = False
    started: float = 0.0
    buf: bytes = b""
    restart_at: float = 0.0


@dataclass
class MetricsClient:
    sock: socket.socket
    since: float
    buf: bytes = b""


@dataclass
class _Counters:
    restarts: int = 0
    reloads: int = 0
    reload_failures: int = 0
    retired: dict[str, object] = field(default_factory=dict)


class Supervisor:
    def __init__(self, cfg: RouterConfig, log: Logger) -> None:
        self.cfg = cfg
        self.log = log
        self.nworkers = cfg.workers or usable_cpus()
        self.listeners: list[tuple[Listener, list[socket.socket]]] = []
        self.slots = [WorkerSlot(i) for i in range(self.nworkers)]
        self.table: SharedTable | None = None
        self.region: StatsRegion | None = None
        self.sel = selectors.DefaultSelector()
        self.metrics_sock: socket.socket | None = None
        self.metrics_clients: dict[int, MetricsClient] = {}
        self.stopping = False
        self.stop_deadline = 0.0
        self.announced = False
        self.counters = _Counters()
        self.loop_name = "asyncio"
        self._wake_r, self._wake_w = socket.socketpair()
        self._watchdog = sd.watchdog_interval()
        self._next_watchdog = 0.0

    # --- start -------------------------------------------------------------------------------

    def start(self) -> None:
        _raise_nofile()
        inherited = sd.listen_fds()
        self.listeners = open_listeners(self.cfg, inherited, self.log, self.nworkers)
        if self.cfg.metrics_listen is not None:
            host, port = self.cfg.metrics_listen
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                s.close()
                raise BindError(f"metrics_listen: cannot listen on {host}:{port}: {e}") from None
            s.listen(64)
            s.setblocking(False)
            self.metrics_sock = s
            self.sel.register(s, selectors.EVENT_READ, "metrics")
        if self.nworkers > 1:
            self.table = SharedTable(self.cfg.max_concurrent_conns, self.nworkers)
        self.region = StatsRegion(self.nworkers)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(sig, lambda _s, _f: None)
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno())
        self.sel.register(self._wake_r, selectors.EVENT_READ, "signal")
        for slot in self.slots:
            self._spawn(slot)

    def worker_sockets(self, index: int) -> list[tuple[Listener, socket.socket]]:
        """Worker `index`'s own socket of each listener (the shared one when there is one)."""
        return [(li, socks[index % len(socks)]) for li, socks in self.listeners]

    def _spawn(self, slot: WorkerSlot) -> None:
        assert self.region is not None
        parent, child = socket.socketpair()
        os.set_inheritable(child.fileno(), False)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 70
            try:
                parent.close()
                self._in_child(slot.index)
                admission = (
                    self.table.for_worker(
                        slot.index, self.cfg.max_concurrent_conns, self.cfg.max_conns_per_ip
                    )
                    if self.table is not None
                    else LocalAdmission(self.cfg.max_concurrent_conns, self.cfg.max_conns_per_ip)
                )
                log = Logger(worker=slot.index)
                self.region.clear(slot.index)
                code = Worker(
                    slot.index, self.cfg, self.worker_sockets(slot.index), admission,
                    self.region, child, log,
                ).run()
            except BaseException:
                with contextlib.suppress(BaseException):
                    Logger().error(
                        "worker_crashed", "worker failed", worker=slot.index,
                        error=traceback.format_exc().strip().splitlines()[-1],
                    )
            finally:
                os._exit(code)
        child.close()
        slot.pid = pid
        slot.control = parent
        slot.ready = False
        slot.buf = b""
        slot.started = time.monotonic()
        parent.setblocking(False)
        self.sel.register(parent, selectors.EVENT_READ, slot)

    def _in_child(self, index: int) -> None:
        """Drop everything that belongs to the supervisor or to other workers.

        Other workers' listening sockets must go too: a copy left open here would keep a
        draining worker's accept queue alive, and connections would wait in it for nobody.
        """
        mine = {id(s) for _li, s in self.worker_sockets(index)}
        for _li, socks in self.listeners:
            for s in socks:
                if id(s) not in mine:
                    s.close()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()
        if self.metrics_sock is not None:
            self.metrics_sock.close()
        for client in self.metrics_clients.values():
            client.sock.close()
        for other in self.slots:
            if other.control is not None:
                other.control.close()

    # --- main loop ---------------------------------------------------------------------------

    def run(self) -> int:
        self.start()
        try:
            while True:
                timeout = 0.25
                for key, _mask in self.sel.select(timeout):
                    tag = key.data
                    if tag == "signal":
                        self._on_signals()
                    elif tag == "metrics":
                        self._on_metrics_accept()
                    elif isinstance(tag, MetricsClient):
                        self._on_metrics_client(tag)
                    elif isinstance(tag, WorkerSlot):
                        self._on_worker_message(tag)
                self._reap()
                now = time.monotonic()
                self._respawn_due(now)
                self._expire_metrics_clients(now)
                if self._watchdog and now >= self._next_watchdog:
                    sd.notify("WATCHDOG=1")
                    self._next_watchdog = now + self._watchdog
                if self.stopping:
                    if all(s.pid == 0 for s in self.slots):
                        self.log.info("stopped", "router stopped")
                        return 0
                    if now >= self.stop_deadline:
                        for s in self.slots:
                            if s.pid:
                                with contextlib.suppress(ProcessLookupError):
                                    os.kill(s.pid, signal.SIGKILL)
        finally:
            signal.set_wakeup_fd(-1)

    def _on_signals(self) -> None:
        try:
            data = self._wake_r.recv(256)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.shutdown(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGUSR1:
                self.log_snapshot()

    def _on_worker_message(self, slot: WorkerSlot) -> None:
        assert slot.control is not None
        try:
            data = slot.control.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(slot.control)
            slot.control.close()
            slot.control = None
            return
        slot.buf += data
        while b"\n" in slot.buf:
            line, slot.buf = slot.buf.split(b"\n", 1)
            words = line.decode(errors="replace").split()
            if words and words[0] == "ready":
                slot.ready = True
                if len(words) > 1:
                    self.loop_name = words[1]
        if not self.announced and all(s.ready for s in self.slots):
            self.announced = True
            names = ",".join(f"{li.name}={_sockname(s[0])}" for li, s in self.listeners)
            self.log.info(
                "ready", "router ready", listeners=names, workers=self.nworkers,
                loop=self.loop_name, routes=len(self.cfg.routes), pid=os.getpid(),
            )
            sd.notify(f"READY=1\nSTATUS={self._status()}\nMAINPID={os.getpid()}")

    def _status(self) -> str:
        return f"routing {len(self.cfg.routes)} routes with {self.nworkers} workers"

    # --- workers dying -----------------------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            self._retire(slot)
            if self.stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            self.counters.restarts += 1
            now = time.monotonic()
            # A worker that dies right after starting is crash-looping: slow the restarts down.
            delay = RESTART_BACKOFF if now - slot.started < RESTART_BACKOFF else 0.0
            slot.restart_at = now + delay
            self.log.warn(
                "worker_exited", "worker died, restarting it", worker=slot.index, pid=pid,
                status=code, restart_in=f"{delay:g}s",
            )

    def _retire(self, slot: WorkerSlot) -> None:
        assert self.region is not None
        slot.pid = 0
        if slot.control is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(slot.control)
            slot.control.close()
            slot.control = None
        last = self.region.read(slot.index)
        if last is not None:
            last["active"] = 0
            last["tracked"] = 0
            self.counters.retired = merge([self.counters.retired, last])
        self.region.clear(slot.index)
        if self.table is not None:
            self.table.reap(slot.index)

    def _respawn_due(self, now: float) -> None:
        if self.stopping:
            return
        for slot in self.slots:
            if slot.pid == 0 and now >= slot.restart_at:
                self._spawn(slot)

    # --- operations --------------------------------------------------------------------------

    def shutdown(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.cfg.drain_timeout + KILL_GRACE
        sd.notify("STOPPING=1\nSTATUS=draining connections")
        self.log.info(
            "draining", "stopping: no new connections, draining live ones", signal=why,
            drain_timeout=self.cfg.drain_timeout,
        )
        # Close our copies so the kernel stops queueing connections nobody will accept.
        for _li, socks in self.listeners:
            for s in socks:
                s.close()
        for slot in self.slots:
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)

    def reload(self) -> None:
        if self.stopping:
            return
        sd.notify(sd.reloading_message())
        try:
            new = load_config(self.cfg.path)
        except ConfigError as e:
            self.counters.reload_failures += 1
            self.log.error(
                "reload_failed", "configuration rejected, keeping the running one", error=str(e)
            )
            sd.notify(f"READY=1\nSTATUS={self._status()} (last reload rejected)")
            return
        needs_restart = [
            key
            for key, old, cur in (
                ("listeners", self.cfg.listeners, new.listeners),
                ("workers", self.cfg.workers, new.workers),
                ("metrics_listen", self.cfg.metrics_listen, new.metrics_listen),
            )
            if old != cur
        ]
        if self.table is not None and new.max_concurrent_conns > self.table.capacity // 2:
            needs_restart.append("max_concurrent_conns")
        if needs_restart:
            self.log.warn(
                "restart_needed", "these changes take effect only after a restart",
                keys=",".join(needs_restart),
            )
        # Listener set and worker count stay as they are; everything else applies now.
        self.cfg = new_cfg = _keep_runtime_shape(new, self.cfg)
        payload = pickle.dumps(new_cfg)
        message = MSG_HEADER.pack(b"C", len(payload)) + payload
        for slot in self.slots:
            if slot.control is not None:
                try:
                    slot.control.setblocking(True)
                    slot.control.settimeout(2.0)
                    slot.control.sendall(message)
                except OSError as e:
                    self.log.warn(
                        "reload_send_failed", "could not pass the config to a worker",
                        worker=slot.index, error=str(e),
                    )
                finally:
                    slot.control.setblocking(False)
        self.counters.reloads += 1
        table = RouteTable.from_config(new_cfg)
        self.log.info(
            "reloaded", "configuration reloaded", routes=len(table), path=new_cfg.path,
        )
        sd.notify(f"READY=1\nSTATUS={self._status()}")

    def aggregate(self) -> tuple[dict[str, object], dict[str, int]]:
        assert self.region is not None
        snaps = [self.counters.retired]
        for slot in self.slots:
            snap = self.region.read(slot.index)
            if snap is not None:
                snaps.append(snap)
        total = merge(snaps)
        local = total.get("tracked", 0)
        tracked = self.table.tracked() if self.table is not None else int(str(local))
        gauges = {
            "tracked_client_ips": tracked,
            "workers": sum(1 for s in self.slots if s.pid),
            "worker_restarts_total": self.counters.restarts,
            "reloads_total": self.counters.reloads,
            "reload_failures_total": self.counters.reload_failures,
        }
        return total, gauges

    def log_snapshot(self) -> None:
        total, gauges = self.aggregate()
        fields: dict[str, object] = {}
        for key, value in sorted(total.items()):
            if key == "tracked":
                continue
            if isinstance(value, dict):
                for k, v in sorted(value.items()):
                    fields[f"{key}.{k}"] = v
            else:
                fields[key] = value
        fields.update(gauges)
        self.log.info("stats", "counters snapshot", **fields)

    # --- /metrics ----------------------------------------------------------------------------

    def _on_metrics_accept(self) -> None:
        assert self.metrics_sock is not None
        for _ in range(16):
            try:
                sock, _addr = self.metrics_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            client = MetricsClient(sock, time.monotonic())
            self.metrics_clients[sock.fileno()] = client
            self.sel.register(sock, selectors.EVENT_READ, client)

    def _close_metrics_client(self, client: MetricsClient) -> None:
        self.metrics_clients.pop(client.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(client.sock)
        client.sock.close()

    def _on_metrics_client(self, client: MetricsClient) -> None:
        try:
            data = client.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        client.buf += data
        if data and b"\r\n\r\n" not in client.buf and len(client.buf) < 8192:
            return
        request = client.buf.split(b"\r\n", 1)[0].split()
        path = request[1].split(b"?")[0] if len(request) >= 2 else b""
        if request and request[0] in (b"GET", b"HEAD") and path == b"/metrics":
            total, gauges = self.aggregate()
            body = render(total, gauges).encode()
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            response = head + (body if request[0] == b"GET" else b"")
        else:
            body = b"not found; try /metrics\n"
            response = (
                b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
        with contextlib.suppress(OSError):
            client.sock.settimeout(1.0)
            client.sock.sendall(response)
        self._close_metrics_client(client)

    def _expire_metrics_clients(self, now: float) -> None:
        for client in list(self.metrics_clients.values()):
            if now - client.since > METRICS_CLIENT_TIMEOUT:
                self._close_metrics_client(client)


def _keep_runtime_shape(new: RouterConfig, old: RouterConfig) -> RouterConfig:
    """The reloaded config with the parts that need a restart kept as they run now."""
    from dataclasses import replace

    return replace(
        new, listeners=old.listeners, workers=old.workers, metrics_listen=old.metrics_listen
    )
