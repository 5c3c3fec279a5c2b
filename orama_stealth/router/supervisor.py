"""The supervisor: owns the listening sockets, forks and reaps the workers, reloads, stops.

It opens every listener (`listeners.open_listeners`: bound here or taken from systemd socket
activation) and holds them for the router's whole life, then forks N workers that inherit them;
the kernel spreads accepts over the workers. It restarts a worker that dies (subtracting what
that worker held from the shared admission table), re-reads the config on SIGHUP and passes it
to the workers over the control channel (`control`), drains on SIGTERM, and answers the systemd
notify protocol. /metrics is the standard library's HTTP server on a thread (`metrics_http`),
rendering the sum of the workers' published counters.

On SIGHUP it also looks at the code on disk (`build`): a different build is checked in a
subprocess (`upgrade.Check`), then this process re-executes itself with it, same PID, handing
its listening sockets, its workers and its counters across the exec (`handover`). The new image
adopts them: it starts new workers on the same sockets, and once they serve, tells the old ones
to drain; they stay its children (a `Generation` each) until their last connection ends.

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
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

from orama_stealth.router import build, control, handover, sd, status, upgrade
from orama_stealth.router.admission import LocalAdmission, SharedTable
from orama_stealth.router.config import ConfigError, RouterConfig, read_config
from orama_stealth.router.listeners import BindError, ListenerSet, OpenListener, open_listeners
from orama_stealth.router.logs import Logger
from orama_stealth.router.metrics import StatsRegion, merge, render
from orama_stealth.router.metrics_http import MetricsServer
from orama_stealth.router.routes import RouteTable
from orama_stealth.router.worker import Worker

__all__ = ["BindError", "Supervisor"]

RESTART_BACKOFF = 1.0
KILL_GRACE = 5.0
# How long the new image's workers may take to serve before the upgrade is reported failed
# (the old workers keep serving meanwhile, and after).
ADOPT_TIMEOUT = 30.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)


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
    error: str = ""  # what the worker said as it died of an exception


@dataclass
class _Counters:
    restarts: int = 0
    reloads: int = 0
    reload_failures: int = 0
    upgrades: int = 0
    upgrade_failures: int = 0
    retired: dict[str, object] = field(default_factory=dict)


@dataclass(eq=False)
class OldWorker:
    """A worker of an earlier build, handed over by the previous image of this process."""

    pid: int
    index: int
    channel: socket.socket | None
    draining: bool


@dataclass(eq=False)
class Generation:
    """The workers of one earlier build and the shared memory they publish into."""

    region: StatsRegion
    table: SharedTable | None
    workers: dict[int, OldWorker] = field(default_factory=dict)

    def close(self) -> None:
        self.region.close()
        if self.table is not None:
            self.table.close()


class Supervisor:
    def __init__(self, cfg: RouterConfig, log: Logger, runtime_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.log = log
        self.build = build.running()
        self.runtime_dir = runtime_dir
        self.generation = 0  # of the status file: one more per SIGHUP handled
        self.old: list[Generation] = []
        self.check: upgrade.Check | None = None
        self.upgrade_to: build.Build | None = None
        self.pending_reload = False
        self.adopting = False  # re-executed: waiting for the new workers before draining the old
        self.adopt_deadline = 0.0
        self.adopted_from = ""
        self._lock = threading.Lock()  # retiring a worker's counters vs. the metrics thread
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
        state = handover.take()
        if state is not None:
            self.adopt(state)
        else:
            inherited = sd.listen_fds()
            self.listeners = open_listeners(self.cfg, inherited, self.log, self.nworkers)
        if self.metrics is None and self.cfg.metrics_listen is not None:
            host, port = self.cfg.metrics_listen
            try:
                self.metrics = MetricsServer((host, port), self.render_metrics)
            except OSError as e:
                self.listeners.close()
                raise BindError(f"metrics_listen: cannot listen on {host}:{port}: {e}") from None
        if self.nworkers > 1:
            self.table = SharedTable(self.cfg.max_concurrent_conns, self.nworkers)
        self.region = StatsRegion(self.nworkers)
        for sig in _SIGNALS:
            signal.signal(sig, lambda _s, _f: None)
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno())
        self.sel.register(self._wake_r, selectors.EVENT_READ, "signal")
        if state is not None:
            # Blocked by the previous image across the exec; what arrived meanwhile is
            # delivered now, to the handlers above.
            upgrade.unblock_signals()
        for slot in self.slots:
            self._spawn(slot)
        # Started after the first forks; a restart later forks with it running, which is safe:
        # it holds nothing a worker needs (see metrics_http).
        if self.metrics is not None:
            self.metrics.start()

    def adopt(self, state: handover.State) -> None:
        """Take over from the previous image of this process (see `handover`)."""
        c = state.counters
        self.counters = _Counters(
            restarts=int(c.get("restarts", 0)), reloads=int(c.get("reloads", 0)),
            reload_failures=int(c.get("reload_failures", 0)),
            upgrades=int(c.get("upgrades", 0)),
            upgrade_failures=int(c.get("upgrade_failures", 0)),
            retired=dict(c.get("retired", {})),
        )
        self.generation = state.generation
        self.pending_reload = state.pending_reload
        self.adopted_from = state.from_build
        self.nworkers = state.nworkers
        self.slots = [WorkerSlot(i) for i in range(self.nworkers)]
        from_file = {li.name: li for li in self.cfg.listeners}
        items: list[OpenListener] = []
        for hl in state.listeners:
            socks = [_adopt_fd(fd) for fd in hl.fds]
            try:
                li = handover.listener_from(hl.definition)
            except handover.HandoverError as e:
                found = from_file.get(hl.name)
                if found is None:
                    self.log.error("listener_lost", "handed-over listener unusable, closing it",
                                   listener=hl.name, error=str(e))
                    for sk in socks:
                        sk.close()
                    continue
                li = found
            for sk in socks:
                sk.setblocking(False)
            items.append(OpenListener(li, socks, hl.how))
        self.listeners = ListenerSet(items)
        metrics_listen = (
            (str(state.metrics_listen[0]), int(state.metrics_listen[1]))
            if state.metrics_listen is not None else None
        )
        running = replace(
            self.cfg, listeners=tuple(o.listener for o in items),
            workers=state.workers_setting, metrics_listen=metrics_listen,
        )
        self._warn_restart_needed(running, self.cfg)
        self.cfg = self.cfg.with_runtime_of(running)
        if state.metrics_fd is not None and metrics_listen is not None:
            self.metrics = MetricsServer(
                metrics_listen, self.render_metrics, _adopt_fd(state.metrics_fd)
            )
        gens = [
            Generation(
                StatsRegion(r.workers, _adopt_raw(r.stats_fd)),
                SharedTable(0, r.workers, _adopt_raw(r.table_fd))
                if r.table_fd is not None else None,
            )
            for r in state.regions
        ]
        for w in state.workers:
            channel = _adopt_fd(w.channel_fd) if w.channel_fd is not None else None
            ow = OldWorker(w.pid, w.index, channel, w.draining)
            gens[w.region].workers[w.pid] = ow
            if channel is not None:
                channel.setblocking(False)
                self.sel.register(channel, selectors.EVENT_READ, ow)
        for g in gens:
            if g.workers:
                self.old.append(g)
            else:
                g.close()
        self.adopting = True
        self.adopt_deadline = time.monotonic() + ADOPT_TIMEOUT
        self.log.info(
            "adopting", "re-executed with a new build, starting its workers", pid=os.getpid(),
            build=self.build.fingerprint, version=self.build.version,
            from_build=state.from_build,
            old_workers=sum(len(g.workers) for g in self.old),
        )

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
                error = traceback.format_exc().strip().splitlines()[-1]
                with contextlib.suppress(BaseException):
                    Logger().error("worker_crashed", "worker failed", worker=slot.index,
                                   error=error)
                with contextlib.suppress(BaseException):
                    child.settimeout(1.0)
                    child.sendall(control.failed(error))
            finally:
                os._exit(code)
        child.close()
        slot.pid = pid
        slot.channel = parent
        slot.ready = False
        slot.error = ""
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
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()
        if self.metrics is not None:
            self.metrics.close_in_child()
        for other in self.slots:
            if other.channel is not None:
                other.channel.close()
        for g in self.old:
            for ow in g.workers.values():
                if ow.channel is not None:
                    ow.channel.close()
            g.close()

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
                    elif isinstance(tag, OldWorker):
                        self._on_old_worker_message(tag)
                self._reap()
                now = time.monotonic()
                self._respawn_due(now)
                self._poll_check()
                if self.adopting and now >= self.adopt_deadline:
                    self._adoption_failed(
                        f"the new build's workers did not start within {ADOPT_TIMEOUT:g}s"
                    )
                if self._watchdog and now >= self._next_watchdog:
                    sd.notify("WATCHDOG=1")
                    self._next_watchdog = now + self._watchdog
                if self.stopping:
                    if all(s.pid == 0 for s in self.slots) and not self.old:
                        self.log.info("stopped", "router stopped")
                        return 0
                    if now >= self.stop_deadline:
                        for pid in self._all_pids():
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGKILL)
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
                self.on_hup()
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
            elif msg["type"] == "failed":
                slot.error = str(msg.get("error", ""))
        if not all(s.ready for s in self.slots):
            return
        if not self.announced:
            self.announced = True
            names = self.listeners.describe()
            self.log.info(
                "ready", "router ready", listeners=names, workers=self.nworkers,
                loop=self.loop_name, routes=len(self.cfg.routes), pid=os.getpid(),
                version=self.build.version, build=self.build.fingerprint,
            )
            if not self.adopting:
                sd.notify(f"READY=1\nSTATUS={self._status()}\nMAINPID={os.getpid()}")
                self._write_status(True, None, bump=False)
        if self._serving_old():
            self._drain_old()

    def _on_old_worker_message(self, ow: OldWorker) -> None:
        """An old worker says nothing the supervisor needs; only its hang-up matters."""
        assert ow.channel is not None
        try:
            data = ow.channel.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(ow.channel)
            ow.channel.close()
            ow.channel = None

    def _status(self) -> str:
        return f"routing {len(self.cfg.routes)} routes with {self.nworkers} workers"

    # --- workers dying -----------------------------------------------------------------------

    def _exited(self) -> list[tuple[int, int]]:
        """(pid, wait status) of the workers that exited. By PID, never waitpid(-1): the upgrade
        check is a child too, and its exit status belongs to its Popen."""
        out: list[tuple[int, int]] = []
        for pid in self._all_pids():
            try:
                got, wstatus = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, wstatus = pid, 0
            if got == pid:
                out.append((pid, wstatus))
        return out

    def _reap(self) -> None:
        for pid, wstatus in self._exited():
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                self._retire_old(pid, wstatus)
                continue
            if slot.channel is not None:
                # What it said last (why it failed) may still be unread.
                self._on_worker_message(slot)
            served = slot.ready
            self._retire(slot)
            if self.stopping:
                continue
            code = os.waitstatus_to_exitcode(wstatus)
            self.counters.restarts += 1
            now = time.monotonic()
            # A worker that dies right after starting is crash-looping: slow the restarts down.
            delay = RESTART_BACKOFF if now - slot.started < RESTART_BACKOFF else 0.0
            slot.restart_at = now + delay
            self.log.warn(
                "worker_exited", "worker died, restarting it", worker=slot.index, pid=pid,
                status=code, restart_in=f"{delay:g}s", error=slot.error or None,
            )
            if self.adopting and not served:
                # The new build cannot serve: say so now rather than at the adoption deadline.
                why = f": {slot.error}" if slot.error else ""
                self._adoption_failed(
                    f"worker {slot.index} of the new build exited with status {code} "
                    f"before serving{why}"
                )

    def _retire(self, slot: WorkerSlot) -> None:
        assert self.region is not None
        slot.pid = 0
        if slot.channel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(slot.channel)
            slot.channel.close()
            slot.channel = None
        with self._lock:
            self._fold(self.region, slot.index)
        if self.table is not None:
            self.table.reap(slot.index)

    def _fold(self, region: StatsRegion, index: int) -> None:
        """A worker is gone: its last published counters join the retired totals."""
        last = region.read(index)
        if last is not None:
            last["active"] = 0
            last["tracked"] = 0
            self.counters.retired = merge([self.counters.retired, last])
        region.clear(index)

    def _retire_old(self, pid: int, wait_status: int) -> None:
        for g in self.old:
            ow = g.workers.pop(pid, None)
            if ow is None:
                continue
            if ow.channel is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(ow.channel)
                ow.channel.close()
                ow.channel = None
            with self._lock:
                self._fold(g.region, ow.index)
            if g.table is not None:
                g.table.forget(ow.index)
            self.log.info(
                "old_worker_exited", "worker of the previous build finished", worker=ow.index,
                pid=pid, status=os.waitstatus_to_exitcode(wait_status),
                left=sum(len(x.workers) for x in self.old),
            )
            if not g.workers:
                with self._lock:
                    self.old.remove(g)
                g.close()
            return

    def _all_pids(self) -> list[int]:
        pids = [s.pid for s in self.slots if s.pid]
        pids += [pid for g in self.old for pid in g.workers]
        return pids

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
        if self.check is not None:
            self.check.kill()
            self.check = None
        # Close our copies so the kernel stops queueing connections nobody will accept.
        self.listeners.close()
        for pid in self._all_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def on_hup(self) -> None:
        """One reload at a time: a SIGHUP during an upgrade is queued, and runs after it."""
        if self.stopping:
            return
        if self.check is not None or self.adopting:
            if not self.pending_reload:
                self.log.info("reload_queued", "an upgrade is in progress; reloading after it")
            self.pending_reload = True
            return
        self.reload()

    def _warn_restart_needed(self, running: RouterConfig, new: RouterConfig) -> None:
        needs_restart = [
            key
            for key, old, cur in (
                ("listeners", running.listeners, new.listeners),
                ("workers", running.workers, new.workers),
                ("metrics_listen", running.metrics_listen, new.metrics_listen),
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

    def reload(self) -> None:
        if self.stopping:
            return
        sd.notify(sd.reloading_message())
        try:
            disk: build.Build | None = build.on_disk()
        except OSError as e:
            self.log.warn("build_unreadable", "cannot fingerprint the code on disk", error=str(e))
            disk = None
        new_build = disk is not None and disk.fingerprint != self.build.fingerprint
        try:
            text, new = read_config(self.cfg.path)
        except ConfigError as e:
            if new_build:
                # The new build may accept what this one does not (a key it added): its check
                # has the last word.
                self.log.info(
                    "config_for_new_build", "configuration rejected by the running build, "
                    "checking it with the new one", error=str(e),
                )
                self._start_upgrade(disk)
                return
            self.counters.reload_failures += 1
            self.log.error(
                "reload_failed", "configuration rejected, keeping the running one", error=str(e)
            )
            sd.notify(f"READY=1\nSTATUS={self._status()} (last reload rejected)")
            self._write_status(False, str(e))
            return
        self._warn_restart_needed(self.cfg, new)
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
        if new_build:
            self._start_upgrade(disk)
            return
        sd.notify(f"READY=1\nSTATUS={self._status()}")
        self._write_status(True, None)

    # --- upgrade -----------------------------------------------------------------------------

    def _start_upgrade(self, disk: build.Build | None) -> None:
        assert disk is not None
        self.upgrade_to = disk
        self.log.info(
            "upgrade_check", "a new build is on disk, checking it", build=self.build.fingerprint,
            to_build=disk.fingerprint, to_version=disk.version,
        )
        sd.notify(sd.reloading_message(f"checking build {disk.fingerprint}"))
        try:
            self.check = upgrade.Check(self.cfg.path)
        except OSError as e:
            self._upgrade_failed(f"cannot run the new build's check: {e}")

    def _poll_check(self) -> None:
        if self.check is None:
            return
        verdict = self.check.poll()
        if verdict is None:
            return
        self.check = None
        ok, reason = verdict
        if ok:
            self._exec_upgrade()
        else:
            self._upgrade_failed(reason)

    def _upgrade_failed(self, reason: str) -> None:
        self.counters.upgrade_failures += 1
        self.log.error(
            "upgrade_failed", "new build rejected, the running one keeps serving",
            reason=reason, build=self.build.fingerprint,
            to_build=self.upgrade_to.fingerprint if self.upgrade_to else None,
        )
        sd.notify(f"READY=1\nSTATUS={self._status()} (last upgrade failed)")
        self._write_status(False, f"upgrade failed: {reason}")
        self._run_pending_reload()

    def _run_pending_reload(self) -> None:
        if self.pending_reload and not self.stopping:
            self.pending_reload = False
            self.reload()

    def _exec_upgrade(self) -> None:
        if self.stopping:
            return
        # From here until the new image has installed its handlers, signals wait (blocked,
        # pending). One that arrived just before is still unread in the wake-up socket: read it
        # now, or it would be lost with this image.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            late = self._wake_r.recv(256)
        except (BlockingIOError, InterruptedError):
            late = b""
        if signal.SIGTERM in late or signal.SIGINT in late:
            upgrade.unblock_signals()
            self.shutdown("SIGTERM" if signal.SIGTERM in late else "SIGINT")
            return
        if signal.SIGHUP in late:
            self.pending_reload = True
        state = self.handover_state()
        if self.metrics is not None:
            self.metrics.pause()
        to = self.upgrade_to
        self.log.info(
            "upgrading", "re-executing with the new build", pid=os.getpid(),
            build=self.build.fingerprint, to_build=to.fingerprint if to else None,
        )
        err = upgrade.reexec(state)
        upgrade.unblock_signals()
        if self.metrics is not None:
            self.metrics.start()
        self._upgrade_failed(f"exec failed: {err}")

    def handover_state(self) -> handover.State:
        assert self.region is not None
        regions = [handover.HandedRegion(
            self.region.fd, self.region.workers,
            self.table.fd if self.table is not None else None,
        )]
        workers = [
            handover.HandedWorker(
                s.pid, s.index, s.channel.fileno() if s.channel is not None else None, 0,
            )
            for s in self.slots if s.pid
        ]
        for gi, g in enumerate(self.old, start=1):
            regions.append(handover.HandedRegion(
                g.region.fd, g.region.workers, g.table.fd if g.table is not None else None,
            ))
            workers.extend(
                handover.HandedWorker(
                    ow.pid, ow.index, ow.channel.fileno() if ow.channel is not None else None,
                    gi, ow.draining,
                )
                for ow in g.workers.values()
            )
        c = self.counters
        return handover.State(
            from_build=self.build.fingerprint,
            nworkers=self.nworkers,
            workers_setting=self.cfg.workers,
            metrics_listen=list(self.cfg.metrics_listen) if self.cfg.metrics_listen else None,
            metrics_fd=self.metrics.fileno() if self.metrics is not None else None,
            generation=self.generation,
            listeners=[
                handover.HandedListener(
                    o.listener.name, o.how, [sk.fileno() for sk in o.sockets],
                    handover.listener_definition(o.listener),
                )
                for o in self.listeners
            ],
            regions=regions,
            workers=workers,
            counters={
                "restarts": c.restarts, "reloads": c.reloads,
                "reload_failures": c.reload_failures, "upgrades": c.upgrades,
                "upgrade_failures": c.upgrade_failures, "retired": c.retired,
            },
            pending_reload=self.pending_reload,
        )

    def _serving_old(self) -> list[OldWorker]:
        return [ow for g in self.old for ow in g.workers.values() if not ow.draining]

    def _drain_old(self) -> None:
        """The new workers serve: the old ones stop accepting and finish their connections."""
        old = self._serving_old()
        for ow in old:
            ow.draining = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(ow.pid, signal.SIGTERM)
        if not self.adopting:
            return
        self.adopting = False
        self.counters.upgrades += 1
        self.log.info(
            "upgraded", "new build serving; old workers drain their connections",
            build=self.build.fingerprint, version=self.build.version,
            from_build=self.adopted_from, draining=len(old), pid=os.getpid(),
        )
        sd.notify(f"READY=1\nSTATUS={self._status()}\nMAINPID={os.getpid()}")
        self._write_status(True, None)
        self._run_pending_reload()

    def _adoption_failed(self, reason: str) -> None:
        """The new build's workers do not come up (one died before serving, or none served in
        time): say so, and let the old ones serve on (they are drained if the new ones do come
        up later)."""
        self.adopting = False
        self.counters.upgrade_failures += 1
        self.log.error(
            "upgrade_failed", "new build's workers not serving, the old ones keep serving",
            reason=reason, build=self.build.fingerprint, from_build=self.adopted_from,
        )
        sd.notify(f"READY=1\nSTATUS={self._status()} (last upgrade failed)\n"
                  f"MAINPID={os.getpid()}")
        self._write_status(False, f"upgrade failed: {reason}")
        self._run_pending_reload()

    def _write_status(self, ok: bool, error: str | None, bump: bool = True) -> None:
        if bump:
            self.generation += 1
        if self.runtime_dir is None:
            return
        try:
            status.write(self.runtime_dir, status.Status(
                self.generation, ok, error, self.build.version, self.build.fingerprint,
                os.getpid(),
            ))
        except OSError as e:
            self.log.warn("status_unwritable", "cannot write the status file",
                          path=str(self.runtime_dir), error=str(e))

    def aggregate(self) -> tuple[dict[str, object], dict[str, int]]:
        assert self.region is not None
        with self._lock:
            snaps = [self.counters.retired]
            for slot in self.slots:
                snap = self.region.read(slot.index)
                if snap is not None:
                    snaps.append(snap)
            draining = 0
            for g in self.old:
                for ow in list(g.workers.values()):
                    # Old workers serve on, undrained, when the new build's never came up.
                    draining += ow.draining
                    snap = g.region.read(ow.index)
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
            "upgrades_total": self.counters.upgrades,
            "upgrade_failures_total": self.counters.upgrade_failures,
            "draining_workers": draining,
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
        return render(
            total, gauges, {"version": self.build.version, "build": self.build.fingerprint}
        )


def _adopt_raw(fd: int) -> int:
    """A descriptor handed over across the exec: not inherited by anything started later."""
    os.set_inheritable(fd, False)
    return fd


def _adopt_fd(fd: int) -> socket.socket:
    return socket.socket(fileno=_adopt_raw(fd))
