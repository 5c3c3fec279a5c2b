"""The supervisor: owns the listening sockets, forks and reaps the workers, reloads, stops.

It opens every listener (`listeners.open_listeners`: bound here or taken from systemd socket
activation) and holds them for the router's whole life, then forks N workers that inherit them;
the kernel spreads accepts over the workers. It restarts a worker that dies (subtracting what
that worker held from the shared admission table), re-reads the config on SIGHUP and passes it
to the workers over the control channel (`control`), drains on SIGTERM, and answers the systemd
notify protocol. /metrics is the standard library's HTTP server on a thread (`metrics_http`),
rendering the sum of the workers' published counters.

Its own loop is `selectors`, not asyncio: forking a replacement worker never happens inside a
running event loop (each worker starts a fresh one).
"""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import signal
import socket
import time
import traceback
from dataclasses import dataclass, field

from orama_stealth.router import control, sd
from orama_stealth.router.admission import LocalAdmission, SharedTable
from orama_stealth.router.config import ConfigError, RouterConfig, read_config
from orama_stealth.router.listeners import BindError, ListenerSet, open_listeners
from orama_stealth.router.logs import Logger
from orama_stealth.router.metrics import StatsRegion, merge, render
from orama_stealth.router.metrics_http import MetricsServer
from orama_stealth.router.routes import RouteTable
from orama_stealth.router.worker import Worker

__all__ = ["BindError", "Supervisor"]

RESTART_BACKOFF = 1.0
KILL_GRACE = 5.0


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
    channel: socket.socket | None = None
    ready: bool = False
    started: float = 0.0
    decoder: control.Decoder = field(default_factory=control.Decoder)
    restart_at: float = 0.0


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
        self.listeners = ListenerSet([])
        self.slots = [WorkerSlot(i) for i in range(self.nworkers)]
        self.table: SharedTable | None = None
        self.region: StatsRegion | None = None
        self.sel = selectors.DefaultSelector()
        self.metrics: MetricsServer | None = None
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
            try:
                self.metrics = MetricsServer((host, port), self.render_metrics)
            except OSError as e:
                self.listeners.close()
                raise BindError(f"metrics_listen: cannot listen on {host}:{port}: {e}") from None
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
        # Started after the first forks; a restart later forks with it running, which is safe:
        # it holds nothing a worker needs (see metrics_http).
        if self.metrics is not None:
            self.metrics.start()

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
                    slot.index, self.cfg, self.listeners.for_worker(slot.index), admission,
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
        slot.channel = parent
        slot.ready = False
        slot.decoder = control.Decoder()
        slot.started = time.monotonic()
        parent.setblocking(False)
        self.sel.register(parent, selectors.EVENT_READ, slot)

    def _in_child(self, index: int) -> None:
        """Drop everything that belongs to the supervisor or to other workers.

        Other workers' listening sockets must go too: a copy left open here would keep a
        draining worker's accept queue alive, and connections would wait in it for nobody.
        """
        self.listeners.keep_only(index)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()
        if self.metrics is not None:
            self.metrics.close_in_child()
        for other in self.slots:
            if other.channel is not None:
                other.channel.close()

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
                    elif isinstance(tag, WorkerSlot):
                        self._on_worker_message(tag)
                self._reap()
                now = time.monotonic()
                self._respawn_due(now)
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
            if self.metrics is not None:
                self.metrics.stop()

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
        assert slot.channel is not None
        try:
            data = slot.channel.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(slot.channel)
            slot.channel.close()
            slot.channel = None
            return
        try:
            messages = slot.decoder.feed(data)
        except control.ControlError as e:
            self.log.warn("control_error", "bad message from a worker", worker=slot.index,
                          error=str(e))
            return
        for msg in messages:
            if msg["type"] == "ready":
                slot.ready = True
                self.loop_name = str(msg.get("loop", self.loop_name))
        if not self.announced and all(s.ready for s in self.slots):
            self.announced = True
            names = self.listeners.describe()
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
        if slot.channel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(slot.channel)
            slot.channel.close()
            slot.channel = None
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
        self.listeners.close()
        for slot in self.slots:
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)

    def reload(self) -> None:
        if self.stopping:
            return
        sd.notify(sd.reloading_message())
        try:
            text, new = read_config(self.cfg.path)
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
        self.cfg = new_cfg = new.with_runtime_of(self.cfg)
        message = control.reload(new_cfg.path, text)
        for slot in self.slots:
            if slot.channel is not None:
                try:
                    slot.channel.setblocking(True)
                    slot.channel.settimeout(2.0)
                    slot.channel.sendall(message)
                except OSError as e:
                    self.log.warn(
                        "reload_send_failed", "could not pass the config to a worker",
                        worker=slot.index, error=str(e),
                    )
                finally:
                    slot.channel.setblocking(False)
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

    def render_metrics(self) -> str:
        """The /metrics body (called on the metrics thread: it only reads)."""
        total, gauges = self.aggregate()
        return render(total, gauges)
