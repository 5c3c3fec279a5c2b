"""The two steps of an upgrade that leave this process: checking the new build in a subprocess,
and re-executing this process with it.

The check runs `python -m orama_stealth.router.cli check --config PATH` with the interpreter
this process runs, so it imports the code on disk exactly as the re-executed image will (every
router module: `check` imports the supervisor and what it imports) and parses the config with
it. It runs beside the supervisor's loop (polled, bounded), so workers keep being supervised.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable

from orama_stealth.router import handover

CHECK_TIMEOUT = 30.0
# Blocked across the exec, so none arrives while the new image has no handler yet; they stay
# pending and are delivered once it has (`unblock_signals`).
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)
_WHERE = re.compile(r'File "([^"]+)", line (\d+)')


class Check:
    """The new build's `check` subprocess; `poll()` is None while it runs, then its verdict."""

    def __init__(self, config_path: str, timeout: float = CHECK_TIMEOUT) -> None:
        # Kept open past this call: the subprocess writes it, poll() reads it.
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if k != handover.ENV}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orama_stealth.router.cli", "check", "--config", config_path],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._err, env=env,
            close_fds=True,
        )
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout

    def poll(self) -> tuple[bool, str] | None:
        code = self.proc.poll()
        if code is None:
            if time.monotonic() < self.deadline:
                return None
            self.kill()
            return False, f"the new build's check did not finish within {self.timeout:g}s"
        if code == 0:
            self._err.close()
            return True, ""
        return False, self._reason(code)

    def _reason(self, code: int) -> str:
        self._err.seek(0)
        text = self._err.read()[-16384:].decode("utf-8", "replace")
        self._err.close()
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            return f"the new build's check exited with status {code}"
        last = lines[-1]
        where = [m for ln in lines[:-1] if (m := _WHERE.search(ln))]
        if where and "Error" in last.split(":", 1)[0]:
            # A traceback: the exception and the last place it names (for a SyntaxError, the
            # file with the error).
            path, line = where[-1].groups()
            return f"{last} ({path}:{line})"
        return last

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        with contextlib.suppress(OSError):
            self._err.close()


def reexec(state: handover.State) -> OSError:
    """Replace this process's image, keeping its PID and `state.fds()`; returns only on failure
    (with what was changed undone)."""
    fds = state.fds()
    for fd in fds:
        os.set_inheritable(fd, True)
    os.environ[handover.ENV] = state.encode()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, sys.orig_argv)
    except OSError as e:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.environ.pop(handover.ENV, None)
        _cloexec(fds)
        return e
    raise AssertionError("unreachable")  # pragma: no cover


def unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def _cloexec(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
